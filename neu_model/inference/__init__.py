"""Running a trained model on images, without any training code.

Input: ``decode`` (bytes to pixels, any bit depth), ``input_files`` (files, folders, archives),
``tiles`` (images to batches of 200x200 tiles on a reader thread). Models: ``predictors`` (the
``Predictor`` protocol, batching and the probability check), ``torch_model`` (a saved
``models/model.pt`` as a network, the one torch predictor), ``runtimes`` (ONNX Runtime and
OpenVINO), ``registry_files`` (a registered version's files, fetched from MLflow), ``loading``
(any model reference in any runtime), ``unknown`` (how unlike the training images a tile is).
Outputs: ``predict`` (the ``neu-predict`` command), ``console``, ``stripmap``, ``overlays``,
``tile_boxes``. The ``export`` stage
(with ``onnx_graphs``) writes the files the runtimes read.

May import: ``core``, ``data``, ``model``, ``localisation``. Never ``training``, ``evaluation``,
``registry`` (MLflow's tracking code) or matplotlib; torch is imported only where a torch model
runs, so ``neu-predict --runtime onnx`` on an ``.onnx`` file loads none.
"""
