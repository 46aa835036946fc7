"""Meta-learned few-shot defect classification (seed 002, MeDetection).

A Siamese network keeps the absolute difference of a good reference's and a test image's features
(:class:`MeDetectionNet`), coordinate attention reweights it, MAML (:mod:`fedinspect.meta.maml`,
written with ``torch.func``) learns an initialisation across product tasks, :func:`fine_tune` adapts it to
a new product and :func:`grad_cam` shows where the "defective" answer comes from.
"""

__all__: list[str] = []
