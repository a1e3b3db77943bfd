"""The figures and documents of a model, with no Ray: metrics, calibration, plots, the model card, the
engines' accuracy guard and MURA's competition format. The jobs that use them are in ``review``."""
