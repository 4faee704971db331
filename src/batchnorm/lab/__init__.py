"""The lab: experiments that test what is claimed about batch normalization.

See :mod:`batchnorm.lab.registry` for how experiments are declared and discovered.
"""
