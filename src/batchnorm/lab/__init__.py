"""The lab: experiments that test what is claimed about batch normalization, on real data,
with figures and reports whose verdicts are computed from the measurements.

Run from the command line (``batchnorm lab list``, ``batchnorm lab run NAME``) or from Python::

    from batchnorm.lab.registry import run_experiment
    path = run_experiment("paper-mnist", "runs/pm", quick=True, dataset="digits")

How to add an experiment (one new file in ``batchnorm/lab/experiments/``, nothing else edited):
see :mod:`batchnorm.lab.registry`. The pieces:

* :mod:`batchnorm.lab.data` — MNIST / Fashion-MNIST (IDX), scikit-learn digits, synthetic;
* :mod:`batchnorm.lab.models` — MLP (BN before/after/none), small CNN, with our BN layers;
* :mod:`batchnorm.lab.train` — the one training loop and its helpers;
* :mod:`batchnorm.lab.config` — typed configs and ``--set`` conversion;
* :mod:`batchnorm.lab.results` — run folders, atomic writes, resume, ``Claim``, ``Results``;
* :mod:`batchnorm.lab.plots` — figure primitives; :mod:`batchnorm.lab.report` — reports.

The library never imports the lab; the lab works without the command line.
"""
