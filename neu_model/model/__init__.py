"""The networks: ``layers`` (the building blocks) and ``networks`` (the models and
``build_model(name, **kwargs)``, the registry of architectures).

May import: ``core``, torch.
"""
