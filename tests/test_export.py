"""Export stage: SavedModel round trip on real image bytes, verification, warmup and versioned publishing.

Uses a tiny Keras model with the training contract (float32 RGB [0, 255] in, softmax out, preprocessing
inside) at 32 px, so the whole file runs in about a minute on two cores.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.model

LABELS = ["circle", "square", "triangle", "cross"]
SIZE = 32
REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3), dtype="float32")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    return keras.Model(inputs, outputs)


def encode(pixels: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels)
    if mode != image.mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def sample_pixels(seed: int, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))[:height, :width]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    from export.savedmodel import export_saved_model

    target = tmp_path_factory.mktemp("export") / "saved_model"
    return export_saved_model(
        model,
        target,
        labels=LABELS,
        model_name="shapes",
        backbone="tiny",
        run_id="run-123",
        metrics={"accuracy": 0.9, "macro_f1": 0.85},
        dataset_fingerprint="abc",
    )


@pytest.fixture(scope="module")
def loaded(exported):
    import tensorflow as tf

    return tf.saved_model.load(str(exported.path))


def keras_probabilities(model, images: list[np.ndarray]) -> np.ndarray:
    """Keras on images decoded independently (Pillow), resized the way training resizes."""
    import tensorflow as tf

    batch = tf.stack(
        [
            tf.image.resize(tf.constant(img), (SIZE, SIZE), method="bilinear", antialias=True)
            if img.shape[:2] != (SIZE, SIZE)
            else tf.constant(img, tf.float32)
            for img in images
        ]
    )
    return np.asarray(model(batch, training=False))


def pil_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        return np.asarray(image.convert("RGB"))


def test_layout_and_metadata(exported):
    path = exported.path
    assert (path / "saved_model.pb").is_file()
    assert (path / "variables").is_dir()
    assert (path / "assets" / "labels.txt").read_text().splitlines() == LABELS
    meta = json.loads((path / "tfloop.json").read_text())
    assert meta["labels"] == LABELS
    assert meta["model_name"] == "shapes"
    assert meta["image_size"] == SIZE
    assert meta["backbone"] == "tiny"
    assert meta["run_id"] == "run-123"
    assert meta["metrics"] == {"accuracy": 0.9, "macro_f1": 0.85}
    assert meta["dataset_fingerprint"] == "abc"
    assert meta["top_k"] == 4
    for key in ("created_at", "tfloop_version", "version"):
        assert key in meta


def test_round_trip_formats_match_keras(model, loaded):
    import tensorflow as tf

    pixels = sample_pixels(1)
    gray = sample_pixels(2)[..., 0]
    rgba = np.concatenate([sample_pixels(3), np.full((SIZE, SIZE, 1), 128, np.uint8)], axis=-1)
    larger = sample_pixels(4, height=48, width=40)
    cases = {
        "jpeg": encode(pixels, "JPEG"),
        "png": encode(pixels, "PNG"),
        "grayscale": encode(gray, "PNG", mode="L"),
        "rgba": encode(rgba, "PNG", mode="RGBA"),
        "gif": encode(sample_pixels(5), "GIF", mode="P"),
        "bmp": encode(pixels, "BMP"),
        "resized": encode(larger, "PNG"),
    }
    images = list(cases.values())
    result = loaded.signatures["serving_default"](image_bytes=tf.constant(images))
    probabilities = result["probabilities"].numpy()
    expected = keras_probabilities(model, [pil_rgb(data) for data in images])
    assert probabilities.shape == (len(images), len(LABELS))
    diff = np.abs(probabilities - expected).max(axis=1)
    for name, row_diff in zip(cases, diff, strict=True):
        # JPEG decoders may differ by one grey level; lossless formats must match exactly.
        assert row_diff <= (2e-3 if name == "jpeg" else 1e-5), name
    order = np.argsort(-expected, axis=1)
    classes = result["classes"].numpy().astype(str)
    assert classes.shape == (len(images), 4)
    assert [row[0] for row in classes] == [LABELS[i] for i in order[:, 0]]
    np.testing.assert_allclose(result["scores"].numpy(), -np.sort(-probabilities, axis=1), atol=1e-6)


def test_predict_images_signature(model, loaded):
    import tensorflow as tf

    batch = np.stack([sample_pixels(7), sample_pixels(8)]).astype(np.float32)
    result = loaded.signatures["predict_images"](images=tf.constant(batch))
    np.testing.assert_allclose(result["probabilities"].numpy(), np.asarray(model(batch)), atol=1e-6)
    spec = loaded.signatures["predict_images"].structured_input_signature[1]["images"]
    assert spec.shape.as_list() == [None, SIZE, SIZE, 3]


def test_malformed_image_fails_the_call_not_the_process(loaded):
    import tensorflow as tf

    good = encode(sample_pixels(9), "PNG")
    for bad in (b"not an image", encode(sample_pixels(9), "JPEG")[:60], b""):
        with pytest.raises(tf.errors.InvalidArgumentError):
            loaded.signatures["serving_default"](image_bytes=tf.constant([good, bad]))
    after = loaded.signatures["serving_default"](image_bytes=tf.constant([good]))
    assert after["probabilities"].shape == (1, len(LABELS))


def test_top_k_is_capped_and_configurable(model, tmp_path):
    import tensorflow as tf

    from export.savedmodel import export_saved_model

    exported = export_saved_model(model, tmp_path / "k2", labels=LABELS, model_name="m", top_k=2)
    loaded = tf.saved_model.load(str(exported.path))
    result = loaded.signatures["serving_default"](image_bytes=tf.constant([encode(sample_pixels(1), "PNG")]))
    assert result["classes"].shape == (1, 2)
    assert exported.metadata["top_k"] == 2


def test_export_rejects_contract_violations(model, tmp_path):
    from export.errors import ExportError
    from export.savedmodel import export_saved_model

    with pytest.raises(ExportError, match=r"4 labels|3 labels"):
        export_saved_model(model, tmp_path / "a", labels=LABELS[:3], model_name="m")
    with pytest.raises(ExportError, match="duplicates"):
        export_saved_model(model, tmp_path / "b", labels=["a", "a", "b", "c"], model_name="m")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_saved_model(model, tmp_path / "c", labels=LABELS, model_name="m")
    for name in ("tfloop.json", "../reference.json"):
        with pytest.raises(ExportError, match="plain file names"):
            export_saved_model(
                model, tmp_path / "d", labels=LABELS, model_name="m", extra_files={name: b"{}"}
            )


def test_extra_files_sit_beside_tfloop_json(model, tmp_path):
    from export.savedmodel import export_saved_model

    exported = export_saved_model(
        model, tmp_path / "e", labels=LABELS, model_name="m", extra_files={"reference.json": b'{"a": 1}'}
    )
    assert (exported.path / "reference.json").read_bytes() == b'{"a": 1}'
    assert (exported.path / "saved_model.pb").is_file()


def test_warmup_file_parses_as_prediction_logs(exported):
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = exported.path / "assets.extra" / "tf_serving_warmup_requests"
    records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    assert 1 <= len(records) <= 1000
    loaded = tf.saved_model.load(str(exported.path))
    for record in records:
        log = prediction_log_pb2.PredictionLog.FromString(record)
        request = log.predict_log.request
        assert request.model_spec.name == "shapes"
        assert request.model_spec.signature_name == "serving_default"
        tensor = tf.make_ndarray(request.inputs["image_bytes"])
        assert tensor.shape == (1,)
        result = loaded.signatures["serving_default"](image_bytes=tf.constant(tensor))
        assert result["classes"].shape == (1, 4)


def test_hand_encoded_warmup_equals_serving_protos():
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    from export.warmup import prediction_log_records

    images = [b"\x89PNG fake", b"\xff\xd8\xff fake"]
    records = prediction_log_records(images, model_name="m", signature_name="sig", input_name="x")
    for image, record in zip(images, records, strict=True):
        expected = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(
                request=predict_pb2.PredictRequest(
                    model_spec=model_pb2.ModelSpec(name="m", signature_name="sig"),
                    inputs={"x": tf.make_tensor_proto([image], dtype=tf.string, shape=[1])},
                )
            )
        )
        assert prediction_log_pb2.PredictionLog.FromString(record) == expected


def test_verify_passes_for_the_exported_model(model, exported):
    from export.verify import verify_saved_model

    report = verify_saved_model(exported.path, model, labels=LABELS)
    assert report.images >= 4
    assert report.max_abs_diff_bytes <= 1e-4


def test_verify_fails_against_a_different_model(exported):
    from export.errors import VerificationError
    from export.verify import verify_saved_model

    with pytest.raises(VerificationError, match="differs from the Keras model"):
        verify_saved_model(exported.path, tiny_model(seed=99), labels=LABELS)
    with pytest.raises(VerificationError, match=r"output '(classes|probabilities)'"):
        verify_saved_model(exported.path, tiny_model_with(len(LABELS) + 1), labels=[*LABELS, "extra"])


def tiny_model_with(classes: int):
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))


def drifting_model():
    """A model whose eager call depends on Python state: its traced graph cannot reproduce it."""
    import keras

    class Drift(keras.layers.Layer):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.calls = 0

        def call(self, inputs):
            self.calls += 1
            return inputs + 40.0 * self.calls

    inputs = keras.Input((SIZE, SIZE, 3))
    x = Drift()(inputs)
    x = keras.layers.Rescaling(1 / 255.0)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(len(LABELS), activation="softmax")(x))


def test_verification_failure_publishes_nothing(tmp_path):
    from export.api import export_model
    from export.errors import VerificationError
    from storage import versions

    base = str(tmp_path / "models")
    with pytest.raises(VerificationError):
        export_model(drifting_model(), base=base, model_name="drift", labels=LABELS)
    assert versions.numbered_versions(base, "drift") == []
    assert not any(p.name.isdigit() for p in (tmp_path / "models" / "drift").glob("*"))


# ---------------------------------------------------------------- publishing


def test_versions_count_up_and_skip_existing(exported, tmp_path):
    import tensorflow as tf

    from export.publish import publish_version
    from storage import versions

    base = str(tmp_path / "models")
    first = publish_version(exported.path, base=base, model_name="shapes")
    assert first.version == 1
    # A version made by someone else (e.g. copied by hand) counts as existing.
    other = tmp_path / "models" / "shapes" / "7"
    other.mkdir(parents=True)
    for name in ("saved_model.pb", "tfloop.json"):
        (other / name).write_bytes((exported.path / name).read_bytes())
    second = publish_version(exported.path, base=base, model_name="shapes")
    assert second.version == 8
    assert versions.complete_versions(base, "shapes") == [1, 7, 8]
    meta = json.loads(Path(second.uri, "tfloop.json").read_text())
    assert meta["version"] == 8
    assert json.loads((exported.path / "tfloop.json").read_text())["version"] is None
    reloaded = tf.saved_model.load(second.uri)
    assert "serving_default" in reloaded.signatures
    # Never overwritten: the first version's files are untouched.
    assert json.loads(Path(first.uri, "tfloop.json").read_text())["version"] == 1


def test_unclaimed_partial_leftover_is_cleaned_and_reused(exported, tmp_path):
    from export.publish import publish_version
    from storage import versions

    base = str(tmp_path / "models")
    publish_version(exported.path, base=base, model_name="shapes")
    partial = tmp_path / "models" / "shapes" / "2"
    (partial / "variables").mkdir(parents=True)
    (partial / "variables" / "variables.index").write_bytes(b"half written")
    assert versions.latest_version(base, "shapes") == 1  # readers ignore it
    published = publish_version(exported.path, base=base, model_name="shapes")
    assert published.version == 2
    assert versions.is_complete(base, "shapes", 2)
    assert (partial / "variables" / "variables.index").read_bytes() != b"half written"


def test_live_claim_is_respected_and_stale_claim_is_cleaned(exported, tmp_path):
    from export.publish import clean_partial_versions, publish_version, try_claim
    from storage import versions

    base = str(tmp_path / "models")
    assert try_claim(base, "shapes", 1, owner="someone-alive")  # this process: alive
    (tmp_path / "models" / "shapes" / "1").mkdir(parents=True)
    (tmp_path / "models" / "shapes" / "1" / "fingerprint.pb").write_bytes(b"x")
    published = publish_version(exported.path, base=base, model_name="shapes")
    assert published.version == 2
    assert (tmp_path / "models" / "shapes" / "1" / "fingerprint.pb").exists()  # in progress: kept
    assert clean_partial_versions(base, "shapes", stale_after_s=-1) == [1]
    assert not (tmp_path / "models" / "shapes" / "1").exists()
    assert versions.complete_versions(base, "shapes") == [2]


def test_concurrent_exports_get_distinct_versions(exported, tmp_path):
    from storage import versions

    base = str(tmp_path / "models")
    results = _publish_concurrently(exported.path, base=base, writers=4, timeout_s=120)
    assert len(set(results)) == 4
    assert versions.complete_versions(base, "shapes") == sorted(results)
    for version in results:
        meta = json.loads((tmp_path / "models" / "shapes" / str(version) / "tfloop.json").read_text())
        assert meta["version"] == version
    assert not list((tmp_path / "models" / "shapes").glob(".staging-*"))


PUBLISH_SCRIPT = """
import sys
from export.publish import publish_version
print(publish_version(sys.argv[1], base=sys.argv[2], model_name="shapes").version)
"""

CRASH_SCRIPT = """
import os, sys, shutil, tempfile
from pathlib import Path
import storage
from export import publish

real_upload = storage.upload_tree
def upload_then_die(local_dir, dst, *, last=("saved_model.pb",)):
    partial = Path(tempfile.mkdtemp()) / "partial"
    shutil.copytree(local_dir, partial)
    (partial / "saved_model.pb").unlink()
    real_upload(partial, dst, last=last)
    os._exit(17)  # the machine dies before saved_model.pb is uploaded
def rename_then_die(src, dst):
    os._exit(17)  # the machine dies between claiming the number and the rename
storage.upload_tree = upload_then_die
publish.os.rename = rename_then_die
publish.publish_version(sys.argv[1], base=sys.argv[2], model_name="shapes")
"""


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=REPO,
    )


def test_concurrent_processes_get_distinct_versions(exported, tmp_path):
    from storage import versions

    base = str(tmp_path / "models")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISH_SCRIPT, str(exported.path), base],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for _ in range(3)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    numbers = sorted(int(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert numbers == versions.complete_versions(base, "shapes")
    assert len(set(numbers)) == 3


def assert_nothing_loadable(base: str) -> None:
    import tensorflow as tf

    from storage import versions

    assert versions.complete_versions(base, "shapes") == []
    assert versions.latest_version(base, "shapes") is None
    for version in versions.numbered_versions(base, "shapes"):
        with pytest.raises((OSError, ValueError, tf.errors.OpError)):
            tf.saved_model.load(versions.version_uri(base, "shapes", version))


def test_crash_mid_export_leaves_nothing_loadable_locally(exported, tmp_path):
    from export.publish import publish_version
    from storage import versions

    base = str(tmp_path / "models")
    crashed = run_script(CRASH_SCRIPT, str(exported.path), base)
    assert crashed.returncode == 17, crashed.stderr
    assert_nothing_loadable(base)
    assert list((tmp_path / "models" / "shapes").glob(".staging-*"))  # the crash left its staging folder
    published = publish_version(exported.path, base=base, model_name="shapes")
    assert versions.complete_versions(base, "shapes") == [published.version]
    assert not list((tmp_path / "models" / "shapes").glob(".staging-*"))  # cleaned by the next export


# ---------------------------------------------------------------- the same on GCS (emulator)


def test_gcs_versions_partial_and_crash(exported, gcs_bucket, tmp_path):
    import tensorflow as tf

    import storage
    from export.publish import publish_version
    from storage import versions

    base = f"{gcs_bucket}/models"
    first = publish_version(exported.path, base=base, model_name="shapes")
    assert first.version == 1
    assert "tfloop.json" in storage.list_files(first.uri)
    assert json.loads(storage.read_text(storage.join(first.uri, "tfloop.json")))["version"] == 1

    # An unclaimed partial upload (no saved_model.pb) is invisible, then cleaned and reused.
    storage.write_bytes(f"{base}/shapes/2/variables/variables.index", b"partial")
    assert versions.latest_version(base, "shapes") == 1
    second = publish_version(exported.path, base=base, model_name="shapes")
    assert second.version == 2
    assert storage.read_bytes(f"{base}/shapes/2/variables/variables.index") != b"partial"

    # A crash mid-upload: files without saved_model.pb, no loadable version; the next export cleans it.
    crashed = run_script(CRASH_SCRIPT, str(exported.path), base)
    assert crashed.returncode == 17, crashed.stderr
    assert versions.complete_versions(base, "shapes") == [1, 2]
    assert versions.numbered_versions(base, "shapes") == [1, 2, 3]
    assert "saved_model.pb" not in storage.list_files(f"{base}/shapes/3")
    third = publish_version(exported.path, base=base, model_name="shapes")
    assert third.version == 4  # the crashed export's number is never reused
    assert versions.numbered_versions(base, "shapes") == [1, 2, 4]
    assert versions.complete_versions(base, "shapes") == [1, 2, 4]

    local_copy = tmp_path / "from-gcs"
    storage.download_tree(third.uri, local_copy)
    loaded = tf.saved_model.load(str(local_copy))
    result = loaded.signatures["serving_default"](image_bytes=tf.constant([encode(sample_pixels(1), "PNG")]))
    assert result["classes"].shape == (1, 4)


def test_gcs_concurrent_exports(exported, gcs_bucket):
    from storage import versions

    base = f"{gcs_bucket}/models"
    results = _publish_concurrently(exported.path, base=base, writers=3, timeout_s=180)
    assert len(set(results)) == 3
    assert versions.complete_versions(base, "shapes") == sorted(results)


def test_fallback_decode_matches_training_decode():
    import tensorflow as tf

    from export.savedmodel import _decode_image_copy
    from training import data as training_data

    images = [
        encode(sample_pixels(21, height=48, width=40), "PNG"),
        encode(sample_pixels(22, height=20, width=24), "JPEG"),
        encode(sample_pixels(23)[..., 0], "PNG", mode="L"),
    ]
    for data in images:
        ours = _decode_image_copy(tf.constant(data), SIZE).numpy()
        theirs = training_data.decode_image(tf.constant(data), image_size=SIZE).numpy()
        np.testing.assert_array_equal(ours, theirs)


LOAD_WITHOUT_KERAS = """
import sys
sys.modules["keras"] = None  # the serving image has no Keras: loading must not need it
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
with open(sys.argv[2], "rb") as handle:
    result = loaded.signatures["serving_default"](image_bytes=tf.constant([handle.read()]))
print(",".join(label.decode() for label in result["classes"].numpy()[0]))
"""


def load_without_keras(saved_model_dir: str, image_path: Path) -> list[str]:
    completed = run_script(LOAD_WITHOUT_KERAS, saved_model_dir, str(image_path))
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout.strip().splitlines()[-1].split(",")


def test_saved_model_loads_without_keras(model, exported, tmp_path):
    import tensorflow as tf

    image = tmp_path / "x.png"
    image.write_bytes(encode(sample_pixels(31), "PNG"))
    classes = load_without_keras(str(exported.path), image)
    in_process = tf.saved_model.load(str(exported.path)).signatures["serving_default"](
        image_bytes=tf.constant([image.read_bytes()])
    )
    assert classes == [label.decode() for label in in_process["classes"].numpy()[0]]


@pytest.mark.slow
def test_real_backbone_exports_verifies_and_serves_without_keras(tmp_path):
    from export.api import export_model
    from training import models

    keras_model = models.build_model("mobilenet_v2", 3, image_size=SIZE, weights="none")
    result = export_model(
        keras_model,
        base=str(tmp_path / "models"),
        model_name="mnv2",
        labels=LABELS[:3],
        backbone="mobilenet_v2",
    )
    assert result.version == 1
    assert result.verification is not None and result.verification.max_abs_diff_bytes <= 1e-4
    image = tmp_path / "x.jpg"
    image.write_bytes(encode(sample_pixels(32), "JPEG"))
    assert sorted(load_without_keras(result.path, image)) == sorted(LABELS[:3])


def _publish_concurrently(path: Path, *, base: str, writers: int, timeout_s: float) -> list[int]:
    """Publish the same export from ``writers`` threads at once; the versions they got (no errors allowed)."""
    from export.publish import publish_version

    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(writers)

    def publish() -> None:
        barrier.wait()
        try:
            results.append(publish_version(path, base=base, model_name="shapes").version)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=publish) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    assert not errors
    return results


@pytest.mark.parametrize("backend", ["local", "gcs"])
def test_find_published_run_names_the_version_of_a_run(backend, tmp_path, request):
    """The lookup that keeps a run from being published twice, on both backends: the version whose
    tfloop.json names the run; versions without (or with broken) metadata are not a tfloop export's."""
    import storage
    from export.publish import find_published_run, publish_version

    root = str(tmp_path) if backend == "local" else request.getfixturevalue("gcs_bucket")
    base = storage.join(root, "models")
    for run_id in ("run-a", "run-b"):
        folder = tmp_path / f"export-{run_id}"
        folder.mkdir()
        (folder / "saved_model.pb").write_bytes(b"graph")
        (folder / "tfloop.json").write_text(json.dumps({"run_id": run_id}))
        publish_version(folder, base=base, model_name="shapes")
    storage.write_bytes(storage.join(base, "shapes", "3", "saved_model.pb"), b"foreign, no tfloop.json")
    storage.write_text(storage.join(base, "shapes", "4", "tfloop.json"), "{broken")
    storage.write_bytes(storage.join(base, "shapes", "4", "saved_model.pb"), b"graph")

    found = find_published_run(base, "shapes", "run-b")
    assert found is not None and found.version == 2 and found.uri == storage.join(base, "shapes", "2")
    assert find_published_run(base, "shapes", "run-a").version == 1
    assert find_published_run(base, "shapes", "run-c") is None
    assert find_published_run(base, "other-model", "run-a") is None
