"""The lab as its users meet it: the command line's errors for bad settings, damaged run
folders and failed downloads — one line naming what was wrong and the remedy, no traceback,
no half-written files."""

import re

import pytest

from batchnorm.cli import main as cli_main
from batchnorm.lab import registry
from batchnorm.lab.config import ConfigError, make_config

# settings that used to pass validation and then failed inside torch (an optimizer, a layer)
# with a traceback, or were silently misread (a negative count slicing off the end)
BAD_SETTINGS = [
    ("dropout", "lr=-1", "lr must be positive"),
    ("dropout", "momentum=-1", "momentum must be >= 0"),
    ("dropout", "hidden=32,0,32", "hidden must list"),
    ("dropout", "n_train_eval=-1", "n_train_eval must be >= 0"),
    ("ics", "widths=0", "widths must list"),
    ("ics", "widths=-1", "widths must list"),
    ("ics", "dln_samples=-1", "dln_samples=-1 is fewer than batch_size"),
    ("initialization", "hidden=0", "hidden must list"),
    ("initialization", "lr=-1", "lr must be positive"),
    ("learning-rate", "channels=0", "channels must list"),
    ("learning-rate", "val_fraction=0", "val_fraction must be in"),
    ("learning-rate", "val_fraction=-1", "val_fraction must be in"),
    ("learning-rate", "halvings=-1", "halvings must be >= 0"),
    ("learning-rate", "weight_decay=-0.1", "weight_decay must be >= 0"),
    ("noisy-bn", "widths=0", "widths must list"),
    ("noisy-bn", "final_window=0", "final_window must be >= 1"),
    ("noisy-bn", "final_window=-1", "final_window must be >= 1"),
    ("noisy-bn", "lr=0", "lr must be positive"),
    ("recalibration", "channels=0", "channels must list"),
    ("recalibration", "bn_momentum=-1", r"bn_momentum must be in \[0, 1\]"),
    ("recalibration", "bn_momentum=2", r"bn_momentum must be in \[0, 1\]"),
    ("small-batch", "gn_groups=0", "gn_groups must be >= 1"),
    ("small-batch", "gn_groups=3", "gn_groups=3 does not divide"),
    ("small-batch", "channels=-1", "channels must list"),
    ("small-batch", "renorm_r_max=0", "renorm_r_max must be >= 1"),
    ("small-batch", "renorm_d_max=-1", "renorm_d_max must be >= 0"),
    ("small-batch", "bn_momentum=1.5", r"bn_momentum must be in \[0, 1\]"),
    ("small-batch", "lr=-1", "lr must be positive"),
    ("smoothness", "widths=0", "widths must list"),
    ("sync-bn", "channels=0", "channels must list"),
    ("sync-bn", "hidden=-1", "hidden must list"),
    ("sync-bn", "n_train=-1", "n_train and n_eval must be >= 0"),
]


@pytest.mark.parametrize(("name", "setting", "message"), BAD_SETTINGS)
@pytest.mark.parametrize("quick", [True, False])
def test_out_of_range_settings_are_config_errors(name, setting, message, quick):
    cls = registry.get(name).config_cls
    with pytest.raises(ConfigError, match=message):
        make_config(cls, quick=quick, sets=[setting])


@pytest.mark.parametrize(
    ("name", "setting", "message"),
    [BAD_SETTINGS[0], BAD_SETTINGS[6], BAD_SETTINGS[22], BAD_SETTINGS[-1]],
)
def test_cli_refuses_bad_settings_in_one_line_before_creating_the_folder(
    name, setting, message, tmp_path, capsys
):
    out = tmp_path / "run"
    code = cli_main(["lab", "run", name, "--quick", "--out", str(out), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ")
    assert re.search(message, err)
    assert not out.exists()


def test_default_and_quick_configs_of_every_experiment_are_valid():
    for exp in registry.all_experiments():
        make_config(exp.config_cls)
        make_config(exp.config_cls, quick=True)
