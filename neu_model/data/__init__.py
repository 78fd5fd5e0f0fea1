"""The images and their labels: from a source to ``data/raw`` and ``data/split.csv``.

Stages: ``source`` (fingerprint the data source), ``download`` (fetch, unpack with ``archive``,
check with ``checks``, publish), ``boxes`` (NEU-DET's defect boxes as ``data/boxes.csv``),
``split``. Helpers: ``fetch`` (cached, retried URL downloads), ``dataset`` (the manifest, the
split and images in memory), ``corruptions`` (what a steel line does to an image), ``foreign`` (tiles that are not
NEU steel, generated offline: what the unknown-input flag is measured on).

May import: ``core``.
"""
