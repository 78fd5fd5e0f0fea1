"""The ``train`` stage: ``train`` (the loop), ``recipe`` (optimizer, schedule, loss, sample
order), ``augment``, ``distributed`` (DDP under torchrun), ``packed`` (memory-mapped training images).

May import: ``core``, ``data``, ``model``, ``inference``, ``registry``, ``evaluation`` (figures).
"""
