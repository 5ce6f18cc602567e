"""igd: Integrated Gradients attributions for PyTorch image classifiers.

The package root stays import-light (no torch): `igctl` and `igd.protocol` import it.
The engine lives in :mod:`igd.engine.attribution`, result files in :mod:`igd.output.results`.
"""

__version__ = "0.1.0"
