"""iscam: the reproducible companion of *IS-CAM: Integrated Score-CAM for axiomatic-based explanations*.

Subpackages and modules:

- :mod:`iscam.methods` -- Grad-CAM, Grad-CAM++, Smooth Grad-CAM++, Score-CAM, SS-CAM, IS-CAM (+ a random baseline)
- :mod:`iscam.metrics` -- insertion/deletion AUC, Average Drop, Increase in Confidence, Win %, energy pointing game
- :mod:`iscam.models` -- the model registry: the paper's CNNs, the offline SqueezeNets and Coral MobileNets
- :mod:`iscam.data` -- ILSVRC2012-val with bounding boxes
- :mod:`iscam.fetch` -- the models and sample images, downloaded and verified by SHA-256
- :mod:`iscam.experiment` -- resumable, provenance-stamped runs
- :mod:`iscam.sanity` -- saliency sanity checks (Adebayo et al. 2018): maps under model randomisation
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
