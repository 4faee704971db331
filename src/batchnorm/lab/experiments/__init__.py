"""One module per experiment; every module here is imported by :mod:`batchnorm.lab.registry`."""
