"""The README's shell examples (and those of the kernels' measurement log it links to): every
``batchnorm ...`` command they show parses with the real argument parsers (flags, choices,
``--set`` keys and values against the experiment's config class, files it reads), their links
resolve, and the command-line behaviour the README describes holds."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import batchnorm
from batchnorm import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the kernels' measurement log, linked from the README's benchmark section
KERNELS_LOG = ROOT / "docs" / "kernels-log.md"

FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.S | re.M)
NOT_SHELL = {"python", "py", "text"}
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")
FLAG = re.compile(r"(--[a-z][a-z0-9-]*)(?:[ =]([A-Za-z][\w|-]*\|[\w|-]+))?")


def _words(line: str) -> list[str]:
    """The words of one command (a leading ``$ ``, ``VAR=value`` prefixes and the comment
    dropped); [] when it is not a ``batchnorm`` command."""
    line = line.strip().removeprefix("$ ")
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # prose or an error message quoted in a block
        return []
    while words and ENV.match(words[0]):
        words.pop(0)
    return words[1:] if words[:1] == ["batchnorm"] else []


def readme_commands(text: str, name: str = "README.md") -> list[tuple[str, list[str]]]:
    """``(where, argv)`` for every ``batchnorm`` command of the shell blocks (``a && b``,
    ``; echo``, backslash continuations and synopsis lines continued by an indented ``[...]``
    line included) and of the inline code spans."""
    found: list[tuple[str, list[str]]] = []
    for block in FENCE.finditer(text):
        if block.group(1) in NOT_SHELL:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        lines = block.group(2).split("\n")
        i = 0
        while i < len(lines):
            where, line = f"{name}:{first + i}", lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i]
            while i + 1 < len(lines) and lines[i + 1].lstrip().startswith("[--"):
                i += 1  # a synopsis continued on the next line
                line += " " + lines[i]
            for part in re.split(r"&&|;", line):
                words = _words(part)
                if words:
                    found.append((where, words))
            i += 1
    fences = [block.span() for block in FENCE.finditer(text)]
    for span in re.finditer(r"`(batchnorm [^`]+)`", text):
        if any(start <= span.start() < end for start, end in fences):
            continue
        where = f"{name}:{text.count(chr(10), 0, span.start()) + 1} (inline)"
        words = _words(span.group(1).replace("\n", " "))
        if words:
            found.append((where, words))
    return found


def _subparser(parser: argparse.ArgumentParser, names: list[str]) -> argparse.ArgumentParser:
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _options(argv: list[str]) -> tuple[str, dict[str, argparse.Action]]:
    """The subcommand of ``argv`` and its options by every spelling."""
    names = argv[:2] if argv[:2] in (["lab", "run"], ["lab", "list"]) else argv[:1]
    parser = _subparser(cli.build_parser(names), names)
    return " ".join(names), {s: a for a in parser._actions for s in a.option_strings}


def _synopsis_problems(argv: list[str]) -> list[str]:
    """A synopsis (``[--flag VALUE]``, ``a|b`` choices, placeholders): every flag it names must
    exist, and every ``a|b|c`` list must be the flag's choices."""
    command, options = _options(argv)
    problems = []
    for flag, values in FLAG.findall(" ".join(argv)):
        if flag not in options:
            problems.append(f"{flag} is not an option of 'batchnorm {command}'")
        elif values and set(values.split("|")) != set(options[flag].choices or ()):
            problems.append(f"{flag} takes {sorted(options[flag].choices or ())}, not {values}")
    return problems


def _lab_run_problems(args: argparse.Namespace) -> list[str]:
    from batchnorm.lab import registry
    from batchnorm.lab.config import make_config

    sets = [s for group in args.sets for s in group]
    name = args.name
    if name is None and sets and "=" not in sets[-1]:  # `--set k=v NAME`
        name = sets.pop()
    names = registry.names() if name == "all" else [name]
    problems = []
    for n in names:
        try:
            cls = registry.get(n).config_cls
            values = {k: getattr(args, k) for k in ("seeds", "dataset", "data_dir", "download")}
            make_config(cls, quick=args.quick, sets=sets, **values)
        except (KeyError, ValueError) as e:
            problems.append(f"{n}: {e}")
    return problems


def command_problems(argv: list[str]) -> list[str]:
    """Why ``batchnorm`` + ``argv`` would not run as the README says ([] if it would): a flag
    or choice the parser refuses, an unknown experiment, a ``--set`` key or value the config
    refuses, a file it reads that is not in the repository."""
    if any(w.startswith("[") or w.isupper() for w in argv):
        return _synopsis_problems(argv)
    parser = cli.build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # (0: --version and --help, which answer and exit)
        return [] if e.code == 0 else [f"argparse refuses {shlex.join(argv)!r}"]
    # argparse also takes a prefix of a flag (--repeat for --repeats): the README spells them out
    command, options = _options(argv)
    problems = [
        f"{w} is not an option of 'batchnorm {command}' (only a prefix of one)"
        for w in argv
        if w.startswith("--") and w.partition("=")[0] not in options
    ]
    if argv[:2] == ["lab", "run"]:
        problems += _lab_run_problems(args)
    if getattr(args, "from_json", None) and not (ROOT / args.from_json).is_file():
        problems.append(f"--from-json {args.from_json}: no such file in the repository")
    factory = getattr(args, "factory", None)
    if factory and factory.partition(":")[0].endswith(".py"):
        if not (ROOT / factory.partition(":")[0]).is_file():
            problems.append(f"{factory}: no such file in the repository")
    return problems


COMMANDS = readme_commands(README.read_text(encoding="utf-8")) + readme_commands(
    KERNELS_LOG.read_text(encoding="utf-8"), "docs/kernels-log.md"
)


def test_readme_shows_the_commands() -> None:
    subcommands = {argv[0] for _, argv in COMMANDS if not argv[0].startswith("-")}
    assert subcommands == set(cli.SUBCOMMANDS)
    assert len(COMMANDS) >= 30


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_readme_command_parses(where: str, argv: list[str]) -> None:
    assert command_problems(argv) == [], f"{where}: batchnorm {shlex.join(argv)}"


def test_the_check_catches_misspellings() -> None:
    text = "\n".join(
        [
            "```bash",
            "batchnorm bench --repeat 3",
            "BATCHNORM_BACKEND=torch batchnorm lab run placement --set stepz=3",
            "batchnorm lab run placement --set steps=many",
            "batchnorm lab run placment --quick",
            "batchnorm bench-network --networks resnet",
            "$ batchnorm doctor examples/nosuch.py:make_model --data x.pt; echo $?",
            "batchnorm doctor MODULE:FACTORY --data inputs.pt [--batchsize 64]",
            "                 [--mode eval|train]",
            "batchnorm lab run placement --quick --set steps=90  # fine",
            "```",
            "and `batchnorm bench --from-json docs/nosuch.json`.",
        ]
    )
    commands = readme_commands(text)
    assert [bool(command_problems(argv)) for _, argv in commands] == [True] * 7 + [False, True]
    assert command_problems(commands[6][1]) == [
        "--batchsize is not an option of 'batchnorm doctor'",
        "--mode takes ['as-built', 'eval', 'train'], not eval|train",
    ]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    prose = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_anchor(h) for h in re.findall(r"^#+\s+(.*)$", prose, flags=re.M)}


def _link_problems(path: Path) -> tuple[list[str], int]:
    """The links of the Markdown file ``path`` (relative to its folder) whose file or heading
    does not exist, and the files it names from the repository's root (``docs/…``) that do
    not; and how many links and names there were."""
    text = path.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", text))
    missing: list[str] = []
    headings: dict[Path, set[str]] = {}  # each linked file's anchors, read once
    for t in targets:
        if t.startswith(("http://", "https://")):
            continue
        file, _, anchor = t.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists():
            missing.append(t)
        elif anchor and where.suffix == ".md":
            if where not in headings:
                headings[where] = _anchors(where)
            if anchor not in headings[where]:
                missing.append(t)
    named = re.findall(r"(?<![\w/.])((?:examples|docs|tests)/[\w./-]+\.\w+)", text)
    missing += sorted({f for f in named if not (ROOT / f.rstrip(".")).exists()})
    return missing, len(targets) + len(named)


def test_readme_links_and_named_files_resolve() -> None:
    missing, count = _link_problems(README)
    assert len(_anchors(README)) > 10 and count > 20
    assert missing == []
    missing, count = _link_problems(KERNELS_LOG)
    assert count >= 1 and missing == []


def test_the_link_check_catches_a_missing_heading(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n\n[up](#top) [gone](#nowhere) [file](other.md) [there](page.md#top) "
        "and docs/nosuch-file.json\n",
        encoding="utf-8",
    )
    missing, count = _link_problems(page)
    assert count == 5 and missing == ["#nowhere", "other.md", "docs/nosuch-file.json"]


# --- the command-line behaviour the README describes ---------------------------------------

FACTORY = """\
import torch


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False), torch.nn.BatchNorm1d(4))
"""


@pytest.fixture
def doctor_files(tmp_path: Path) -> Path:
    (tmp_path / "factory.py").write_text(FACTORY)
    torch.save(torch.randn(64, 6), tmp_path / "x.pt")
    return tmp_path


def _closed_stdout(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``batchnorm argv`` with a reader on its stdout that has already quit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchnorm.cli", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the command has imported torch and has output
    err = proc.stderr.read()
    return subprocess.CompletedProcess(argv, proc.wait(timeout=300), "", err)


def test_doctor_into_a_reader_that_quits_keeps_its_exit_code(doctor_files: Path) -> None:
    # `--mode train`: BN on batch statistics, nothing to report, so the exit code is 0
    argv = ["doctor", "factory.py:make_model", "--data", "x.pt", "--batch-size", "16"]
    res = _closed_stdout([*argv, "--mode", "train"], doctor_files)
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr
    assert res.returncode == 0, res.stderr


def test_lab_list_into_a_reader_that_quits(tmp_path: Path) -> None:
    res = _closed_stdout(["lab", "list"], tmp_path)
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr
    assert res.returncode == 0, res.stderr


def test_doctor_checkpoint_that_does_not_fit_is_one_line(
    doctor_files: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # torch's own message for this spans several lines (missing keys, size mismatches)
    torch.save({"0.weight": torch.randn(3, 3)}, doctor_files / "other.pt")
    monkeypatch.chdir(doctor_files)
    argv = ["doctor", "factory.py:make_model", "--data", "x.pt", "--checkpoint", "other.pt"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("batchnorm doctor: --checkpoint: 'other.pt' does not fit the model: ")
    assert "size mismatch for 0.weight" in err and "Missing key(s)" in err


def test_a_bad_backend_in_the_environment_is_one_line_before_any_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from batchnorm.cli import main as cli_main

    monkeypatch.setenv("BATCHNORM_BACKEND", "Torch")
    out = tmp_path / "run"
    assert cli_main(["lab", "run", "placement", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "$BATCHNORM_BACKEND is 'Torch'" in err and "aten, auto, numba, torch" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(ValueError, match=r"\$BATCHNORM_BACKEND='Torch': unknown"):
        batchnorm.BatchNorm1d(3)(torch.randn(8, 3))
    monkeypatch.setenv("BATCHNORM_BACKEND", "")  # empty: auto
    assert cli_main(["lab", "list"]) == 0
    assert (
        cli_main(["lab", "run", "placement", "--quick", "--data-dir", " ", "--out", str(out)]) == 2
    )
    assert "--data-dir is empty" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("value", ["0", "false", " off ", "No"])
def test_the_native_switch_takes_every_spelling_of_off(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from batchnorm import native

    monkeypatch.setenv("BATCHNORM_NATIVE", value)
    assert not native.enabled()
    for on in ("1", " Yes", "on", ""):
        monkeypatch.setenv("BATCHNORM_NATIVE", on)
        assert native.enabled()


def test_a_native_switch_that_is_neither_on_nor_off_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo (``of``, ``maybe``) left the node on without a word."""
    import torch

    import batchnorm
    from batchnorm import native
    from batchnorm.cli import main as cli_main

    monkeypatch.setenv("BATCHNORM_NATIVE", "of")
    with pytest.raises(ValueError, match=r"^\$BATCHNORM_NATIVE is 'of'; it takes 0, false"):
        native.enabled()
    with pytest.raises(ValueError, match=r"\$BATCHNORM_NATIVE is 'of'"):
        batchnorm.BatchNorm1d(3)(torch.randn(8, 3))
    assert cli_main(["bench", "--shapes", "60x100", "--repeats", "3"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "$BATCHNORM_NATIVE is 'of'" in err


def test_compile_into_a_closed_pipe_is_no_traceback() -> None:
    from conftest import run_into_closed_pipe

    command = f"{sys.executable} -m batchnorm.cli compile --dtype float32 --layout rows"
    proc = run_into_closed_pipe(command, timeout=600)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr


def test_a_thread_count_numba_refuses_is_named_before_numba_is_imported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Numba's own refusal is a ValueError from inside its import, naming no variable
    from batchnorm.cli import main as cli_main

    monkeypatch.setenv("NUMBA_NUM_THREADS", "0")
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--shapes", "60x100", "--repeats", "3", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert "$NUMBA_NUM_THREADS is '0'" in err and "unset it" in err
    # the output caches' budget, the same way
    monkeypatch.delenv("NUMBA_NUM_THREADS")
    monkeypatch.setenv("BATCHNORM_OUTPUT_CACHE_MB", "-3")
    assert cli_main(["bench", "--shapes", "60x100", "--repeats", "3", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert "$BATCHNORM_OUTPUT_CACHE_MB is '-3'" in err
    monkeypatch.delenv("BATCHNORM_OUTPUT_CACHE_MB")
    monkeypatch.setenv("NUMBA_NUM_THREADS", "0")
    code = "import torch, batchnorm; batchnorm.BatchNorm1d(3)(torch.randn(8, 3))"
    for value, refused in (("0", True), ("-1", True), ("1", False), ("many", True), ("2.0", True)):
        env = {k: v for k, v in os.environ.items() if k != "BATCHNORM_BACKEND"}
        env["NUMBA_NUM_THREADS"] = value  # the default backend, auto, takes the kernels
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert (run.returncode != 0) == refused, (value, run.stderr)
        if refused:
            last = run.stderr.strip().splitlines()[-1]
            assert last.startswith(f"ValueError: $NUMBA_NUM_THREADS is '{value}'"), run.stderr
            assert "set it to a count from 1 to" in last
            assert ("whole number" in last) == (value in ("many", "2.0"))
            assert "site-packages/numba" not in run.stderr  # raised before Numba's import


def test_ctrl_c_while_a_command_s_modules_load_is_a_note_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(name: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert cli.main(["lab", "run", "placement", "--quick"]) == 130
    assert capsys.readouterr().err == "batchnorm lab: interrupted\n"


def test_a_progress_switch_that_is_neither_on_nor_off_is_refused_by_the_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``BATCHNORM_PROGRESS=of`` fell back to the terminal rule without a word."""
    from batchnorm.cli import main as cli_main
    from batchnorm.lab import train

    monkeypatch.setenv("BATCHNORM_PROGRESS", "of")
    assert cli_main(["bench", "--shapes", "60x100", "--repeats", "3"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "$BATCHNORM_PROGRESS is 'of'" in err
    # from Python, the bars follow the terminal rule, as when the variable is not set
    assert train.progress_enabled() is sys.stderr.isatty()


def test_python_m_batchnorm_is_the_command_and_says_its_version() -> None:
    import subprocess
    from importlib import metadata

    for argv in (["-m", "batchnorm", "--version"], ["-m", "batchnorm.cli", "--version"]):
        out = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, timeout=300, check=True
        )
        assert out.stdout.strip() == f"batchnorm {metadata.version('batchnorm')}"
    bad = subprocess.run(
        [sys.executable, "-m", "batchnorm", "bench", "--json", ""], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--json is empty" in bad.stderr
