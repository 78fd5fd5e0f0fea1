"""NEU-CLS steel surface-defect classification, in subpackages by job (docs/architecture.md).

Layers, lowest first; a subpackage imports only those before it:
``core`` → ``data`` → ``model`` → ``localisation`` → ``inference`` → ``registry`` →
``evaluation`` → ``training`` → ``ops``. ``tests/test_layers.py`` enforces the order.
"""
