"""Test-time mirror averaging (``inference.mirror``): the same averaged probabilities in every path that
runs the model: the torch module, evaluate's predictions, the torch runtime and the logged pyfunc model."""

from __future__ import annotations

import os
import shutil

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from neu_model.core.config import CLASSES
from neu_model.data.dataset import load_split, to_float
from neu_model.evaluation.evaluate import evaluate
from neu_model.inference import runtimes
from neu_model.inference.torch_model import MirrorAverage, load_torch_model, predict_logits, probability_model
from neu_model.registry import mlflow_model

from conftest import tiny_config


def averaged(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The definition: the mean of the softmax on the images and on their mirror images."""
    with torch.no_grad():
        return (net(x).softmax(1) + net(x.flip(-1)).softmax(1)) / 2


@pytest.fixture(scope="module")
def net(tiny_model) -> torch.nn.Module:
    return load_torch_model(tiny_model)[0]


@pytest.fixture(scope="module")
def test_images(tiny_data) -> torch.Tensor:
    return load_split("test", tiny_data.split, tiny_data.images).images


def test_mirror_model_gives_the_averaged_probabilities(net, test_images):
    x = to_float(test_images)
    with torch.no_grad():
        probs = probability_model(net, mirror=True)(x)
        plain = probability_model(net)(x)
    torch.testing.assert_close(probs, averaged(net, x), atol=1e-6, rtol=1e-5)
    assert (probs - plain).abs().max() > 1e-4  # the mirror image does change the answer


def test_mirror_model_cannot_tell_an_image_from_its_mirror_image(net, test_images):
    x = to_float(test_images)
    model = probability_model(net, mirror=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.flip(-1)), atol=1e-6, rtol=1e-5)


def test_mirror_output_stands_for_logits(net, test_images):
    # evaluate applies softmax to what the model returns: the wrapped network must survive that
    probs = predict_logits(MirrorAverage(net), test_images, torch.device("cpu")).softmax(1)
    torch.testing.assert_close(probs, averaged(net, to_float(test_images)), atol=1e-6, rtol=1e-5)


def test_torch_runtime_averages_when_asked(tiny_model, net, test_images):
    x = to_float(test_images)
    models = tiny_model.parent
    probs = runtimes.variant_predictor("torch", models, mirror=True).predict(x.numpy())
    np.testing.assert_allclose(probs, averaged(net, x).numpy(), atol=1e-6)


@pytest.mark.slow
def test_evaluate_with_mirror_scores_the_averaged_probabilities(tiny_data, tiny_model, net, tmp_path):
    evaluate(tiny_config("inference.mirror=true"), tiny_model, tiny_data.split, tiny_data.images, tmp_path)
    frame = pd.read_csv(tmp_path / "predictions.csv")
    test = load_split("test", tiny_data.split, tiny_data.images)
    expected = averaged(net, to_float(test.images)).numpy()
    assert list(frame["file"]) == list(test.files)
    np.testing.assert_allclose(frame[[f"p_{c}" for c in CLASSES]].to_numpy(), expected, atol=2e-6)


@pytest.mark.slow
def test_logged_mirror_model_serves_the_averaged_probabilities(tiny_model, net, test_images, tmp_path):
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment(f"mirror-{tmp_path.name}")
    run_id = client.create_run(experiment).info.run_id
    model_file = shutil.copy(tiny_model, tmp_path / "model.pt")
    info = mlflow_model.log_model(client, experiment, run_id, model_file, 200, mirror=True)
    model = mlflow.pyfunc.load_model(info.model_uri)
    x = to_float(test_images)
    served = model.predict(x.numpy())
    assert served.shape == (len(x), 8)  # probabilities, unknown score, unknown flag
    np.testing.assert_allclose(served[:, :6], averaged(net, x).numpy(), atol=1e-6)
    assert model.metadata.metadata["mirror"] is True
    assert client.get_logged_model(info.model_id).tags["inference.mirror"] == "true"
