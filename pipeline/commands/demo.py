"""``tfloop demo`` (what ``make demo`` runs): the whole loop on embedded defaults, then a summary.

Make the demo data, train v1 through the ``train-and-deploy`` flow (gate, export, register, promote),
start the serving process locally, classify sample images over HTTP, send corrected labels through
``/feedback``, check the feedback threshold (the demo's stand-in for the Prefect server's trigger; with
``tfloop flows server`` + ``tfloop flows deploy`` + ``tfloop flows worker`` the trigger starts
``feedback-retrain`` itself), retrain v2 through ``retrain-from-feedback`` and its gate (its candidate
smoke test runs on the pinned route ``/v1/models/<name>/versions/2``), show that unpinned requests still
get v1 while v2 is published, promote v2 (live pointer and MLflow ``champion``), show unpinned requests
moving to v2, and print v1 and v2 side by side with the MLflow UI command and serving URL. Image build and
rollout run only where a builder and a cluster exist; otherwise the flow says "skipped".
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.commands._output import emit_json, info

DEMO_CHOICES = ("checkerboard", "circle", "cross", "square", "stripes", "triangle")
MODEL_VERSION_HEADER = "X-Model-Version"
# The demo's test split holds about a hundred images: at 95% confidence the gate can only tell two equally
# good models apart from a worse one by a margin this wide (a real dataset's thousands of test items let
# the default margins of training.gate.GatePolicy decide).
DEMO_MARGIN = 0.15


def _step(number: int, text: str) -> None:
    typer.secho(f"\n[{number}] {text}", bold=True, err=True)


def demo(
    per_class: Annotated[int, typer.Option(help="Demo images per class.")] = 80,
    image_size: Annotated[int, typer.Option(help="Training and demo image size (pixels).")] = 48,
    epochs: Annotated[int, typer.Option(help="Training epochs of v1 and v2.")] = 8,
    classes: Annotated[
        str, typer.Option(help="Comma-separated demo classes (of: " + ", ".join(DEMO_CHOICES) + ").")
    ] = ",".join(DEMO_CHOICES),
    corrections: Annotated[int, typer.Option(help="Corrected labels to send (also the threshold).")] = 12,
    min_accuracy: Annotated[
        float, typer.Option(help="The gate's accuracy floor (v1 must reach it to be served).")
    ] = 0.5,
    keep_serving: Annotated[
        bool, typer.Option("--keep-serving", help="Keep the serving process running until Ctrl-C.")
    ] = False,
    fresh: Annotated[
        bool, typer.Option("--fresh/--reuse", help="Start from an empty demo state folder (default).")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON line too.")] = False,
) -> None:
    """Run the whole loop locally: data, v1, serving, feedback, trigger, v2 through the gate, hot swap."""
    import storage
    from pipeline.settings import TfloopSettings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    labels = tuple(label.strip() for label in classes.split(",") if label.strip())
    settings = TfloopSettings()
    if fresh:
        settings = settings.model_copy(update={"home": settings.home_dir / "demo-run"})
        reset_state(settings.home_dir)
    os.environ["PREFECT_HOME"] = str(settings.prefect_home)
    os.environ.pop("PREFECT_API_URL", None)
    started = time.monotonic()
    summary: dict[str, Any] = {"home": str(settings.home_dir)}

    _step(1, f"demo data: {per_class} images per class in {settings.dataset_uri}")
    make_data(settings.dataset_uri, per_class=per_class, image_size=image_size, seed=0, labels=labels)

    _step(2, "train v1 (flow train-and-deploy: train -> evaluate -> gate -> export -> promote)")
    v1 = run_flow(settings, feedback=False, image_size=image_size, epochs=epochs, min_accuracy=min_accuracy)
    summary["v1"] = v1
    info(f"MLflow run {v1['run_id']}; gate: {v1['gate_reason']}")
    info(f"open the MLflow UI: {mlflow_ui_command(settings)}")
    if v1.get("exported_version") is None:
        typer.secho(
            "v1 did not pass the gate; nothing to serve. Try more --epochs or a lower --min-accuracy.",
            err=True,
            fg="red",
        )
        raise typer.Exit(1)

    _step(3, "start serving locally (python -m serving)")
    with LocalServing(settings) as serving:
        probe = fresh_samples(labels[:1], per_class=1, image_size=image_size, seed=11)[0][1]
        served = serving.wait_for_unpinned(int(v1["exported_version"]), probe)
        info(f"serving {settings.model_name} v{served} (live) at {serving.url}")

        _step(4, "classify new sample images over HTTP (POST /classify)")
        samples = fresh_samples(
            labels, per_class=max(2, corrections // len(labels) + 1), image_size=image_size, seed=7
        )
        random.Random(0).shuffle(samples)
        classified = [serving.classify(data) for _, data in samples]
        right = sum(
            answer["top_k"][0]["label"] == label
            for (label, _), answer in zip(samples, classified, strict=True)
        )
        info(f"v1 got {right}/{len(samples)} new images right")
        for (label, _), answer in list(zip(samples, classified, strict=True))[:5]:
            top = answer["top_k"][0]
            info(f"  true {label:>12} -> predicted {top['label']:>12} ({top['score']:.2f})")

        _step(5, f"send {corrections} corrected labels (POST /feedback with the prediction_id)")
        pairs = list(zip(samples, classified, strict=True))[:corrections]
        sent = [serving.feedback(answer["prediction_id"], label) for (label, _), answer in pairs]
        info(f"accepted {len(sent)} corrections; queue: {serving.stats()}")

        _step(6, "threshold check (the demo's stand-in for the Prefect trigger on tfloop.feedback.received)")
        from pipeline.feedback_queue import feedback_threshold_reached, pending_files

        pending = len(pending_files(settings.feedback_root))
        reached = feedback_threshold_reached(feedback_root=settings.feedback_root, threshold=corrections)
        info(
            f"{pending} corrections pending, threshold {corrections}: "
            + ("reached -> start retrain-from-feedback" if reached else "not reached")
        )
        summary["trigger"] = f"demo threshold check: {pending} pending >= {corrections}: {reached}"
        if not reached:
            raise storage.TfloopError("the feedback did not reach the queue; check the serving log above")

        _step(
            7, "retrain v2 (flow retrain-from-feedback: the same steps, gated against v1; not promoted yet)"
        )
        typer.echo(
            f"the gate: v2 must not be worse than v1 by more than {DEMO_MARGIN:.2f} at 95% confidence on the "
            "same test images (a margin this wide because the demo's test split is small)",
            err=True,
        )
        v2 = run_flow(
            settings,
            feedback=True,
            image_size=image_size,
            epochs=epochs,
            min_accuracy=min_accuracy,
            serving_url=serving.url,
            promote=False,
        )
        summary["v2"] = v2
        info(f"gate: {'PASSED' if v2['gate_passed'] else 'REFUSED'}: {v2['gate_reason']}")
        v1_version = int(v1["exported_version"])
        if v2.get("exported_version") is not None:
            v2_version = int(v2["exported_version"])
            _step(8, f"v{v2_version} is published and smoke-tested, but not live: serving still answers v1")
            unpinned = serving.wait_for_unpinned(v1_version, probe)
            pinned = serving.wait_for_pinned(v2_version, probe)
            info(f"  POST /v1/models/{settings.model_name}:predict -> X-Model-Version: {unpinned}")
            info(f"  POST /v1/models/{settings.model_name}/versions/{v2_version}:predict -> version {pinned}")
            summary["before_promotion"] = {"unpinned": unpinned, "pinned": pinned}

            _step(
                9, f"promote v{v2_version} (what `tfloop promote {v2_version}` does): live pointer + champion"
            )
            from export.registry import promote_version

            promotion = promote_version(
                model_name=settings.model_name,
                model_base=settings.models_uri,
                version=v2_version,
                tracking_uri=settings.tracking_uri,
                promoted_by="tfloop demo",
            )
            info(f"  {promotion.live_pointer} -> version {promotion.version} (was {promotion.previous})")
            after = serving.wait_for_unpinned(v2_version, probe)
            info(f"  POST /v1/models/{settings.model_name}:predict -> X-Model-Version: {after}")
            summary["after_promotion"] = {"unpinned": after}
        else:
            info(f"serving keeps v{v1_version}")
        summary["serving_version"] = serving.unpinned_version(probe)
        summary["serving_url"] = serving.url

        _step(10, "summary")
        for line in summary_lines(
            settings, v1=v1, v2=v2, serving_url=serving.url, live_version=summary["serving_version"]
        ):
            typer.echo(line)
        typer.echo(f"finished in {time.monotonic() - started:.0f} s")
        if keep_serving:
            info("serving keeps running; Ctrl-C stops it")
            try:
                serving.wait()
            except KeyboardInterrupt:
                info("stopping")
    if not keep_serving:
        typer.echo(f"serve it again: {serve_command(settings)}")
    if as_json:
        emit_json(summary)


# --- helpers of the demo ---------------------------------------------------------------------------------


def reset_state(home: Path) -> None:
    """Empty the demo's own state folder (only ever ``<TFLOOP_HOME>/demo-run``)."""
    import shutil

    if home.name == "demo-run" and home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)


def make_data(uri: str, *, per_class: int, image_size: int, seed: int, labels: tuple[str, ...]) -> None:
    """Write the procedurally drawn demo dataset unless it is already there."""
    import storage
    from training.demo_data import make_demo_dataset

    if storage.exists(uri):
        info(f"reusing the dataset in {uri}")
        return
    summary = make_demo_dataset(uri, per_class=per_class, image_size=image_size, seed=seed, labels=labels)
    info(f"wrote {summary.files} images of {len(summary.labels)} classes: {', '.join(summary.labels)}")


def fresh_samples(
    labels: tuple[str, ...], *, per_class: int, image_size: int, seed: int
) -> list[tuple[str, bytes]]:
    """New demo images (another seed, so the model has not seen them) as (true label, JPEG bytes)."""
    import io

    from training.demo_data import draw_demo_image

    samples = []
    for label in labels:
        for index in range(per_class):
            buffer = io.BytesIO()
            draw_demo_image(label, seed=seed * 1_000_003 + index, image_size=image_size).save(
                buffer, format="JPEG"
            )
            samples.append((label, buffer.getvalue()))
    return samples


def run_flow(
    settings: Any,
    *,
    feedback: bool,
    image_size: int,
    epochs: int,
    min_accuracy: float,
    serving_url: str | None = None,
    promote: bool = True,
) -> dict[str, Any]:
    """Run train-and-deploy (v1) or retrain-from-feedback (v2) in this process on the demo settings."""
    from pipeline import flows
    from pipeline.options import DeliveryOptions, GateOptions, TrainingOptions

    kwargs: dict[str, Any] = {
        "home": str(settings.home_dir),
        "training": TrainingOptions(image_size=image_size, epochs=epochs, batch_size=16),
        "gate": GateOptions(
            min_accuracy=min_accuracy,
            max_accuracy_drop=DEMO_MARGIN,
            max_macro_f1_drop=DEMO_MARGIN,
            max_reference_accuracy_drop=DEMO_MARGIN,
        ),
        "delivery": DeliveryOptions(serving_url=serving_url, smoke_timeout_s=180.0, promote=promote),
    }
    if feedback:
        return flows.retrain_from_feedback(reason="demo: feedback threshold reached", **kwargs)
    return flows.train_and_deploy(reason="demo: first model", **kwargs)


def mlflow_ui_command(settings: Any) -> str:
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    program = str(mlflow_cli) if mlflow_cli.exists() else "mlflow"
    return f"{program} ui --backend-store-uri {settings.tracking_uri} --port 5000"


def serve_command(settings: Any) -> str:
    return (
        f"tfloop serve --model-base {settings.models_uri} --model-name {settings.model_name} "
        f"--feedback {settings.feedback_root} --port 8501"
    )


def summary_lines(
    settings: Any,
    *,
    v1: dict[str, Any],
    v2: dict[str, Any],
    serving_url: str,
    live_version: int | None = None,
) -> list[str]:
    """v1 and v2 side by side on v2's held-out data (the gate's evaluation), what is live, where to look.

    ``live_version`` is what serving answers unpinned requests with at the end (after the demo's promotion).
    """
    candidate = v2.get("candidate_metrics") or {}
    champion = v2.get("champion_metrics") or {}

    def cell(metrics: dict[str, Any], key: str) -> str:
        value = metrics.get(key)
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "",
        "accuracy on the same held-out data (incl. held-out corrected labels):",
        f"  {'metric':<26}{'v1 (champion)':>16}{'v2 (candidate)':>16}",
    ]
    for key, name in (
        ("accuracy", "accuracy"),
        ("macro_f1", "macro F1"),
        ("corrected_accuracy", "corrected-label accuracy"),
    ):
        lines.append(f"  {name:<26}{cell(champion, key):>16}{cell(candidate, key):>16}")
    lines += [
        f"  held-out items: {candidate.get('count', '-')}, of them corrected labels: "
        f"{candidate.get('corrected_count', '-')}",
        f"gate for v2: {'PASSED' if v2.get('gate_passed') else 'REFUSED'}: {v2.get('gate_reason')}",
        *(
            f"skipped: {reason}"
            for reason in v2.get("skipped") or v1.get("skipped") or []
            if live_version is None or not reason.startswith("promotion:")
        ),
        *([f"live: version {live_version} (unpinned requests, X-Model-Version)"] if live_version else []),
        f"MLflow runs: v1 {v1.get('run_id')}, v2 {v2.get('run_id')}",
        f"MLflow UI: {mlflow_ui_command(settings)}",
        f"serving URL: {serving_url} (page: {serving_url}/, API: {serving_url}/docs)",
    ]
    return lines


class LocalServing:
    """``python -m serving`` in a subprocess on a free loopback port, polling the demo's model base."""

    def __init__(
        self, settings: Any, *, poll_interval_s: float = 1.0, startup_timeout_s: float = 300.0
    ) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = settings
        self.poll_interval_s = poll_interval_s
        self.startup_timeout_s = startup_timeout_s
        self.log_path = settings.home_dir / "serving.log"
        self.process: Any = None

    def __enter__(self) -> LocalServing:
        import subprocess
        import sys

        import httpx

        env = dict(os.environ)
        env.update(
            {
                "TFLOOP_SERVE_MODEL_BASE": self.settings.models_uri,
                "TFLOOP_SERVE_MODEL_NAME": self.settings.model_name,
                "TFLOOP_SERVE_FEEDBACK_URI": self.settings.feedback_root,
                "TFLOOP_SERVE_CACHE_DIR": str(self.settings.home_dir / "serving-cache"),
                "TFLOOP_SERVE_HOST": "127.0.0.1",
                "TFLOOP_SERVE_PORT": str(self.port),
                "TFLOOP_SERVE_POLL_INTERVAL_S": str(self.poll_interval_s),
                "TFLOOP_SERVE_LOG_LEVEL": "warning",
            }
        )
        env.pop("PREFECT_API_URL", None)
        env.pop("TFLOOP_SERVE_PREFECT_API_URL", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "serving"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise _serving_error(
                    f"the serving process exited with {self.process.returncode}", self.log_path
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise _serving_error(
            f"serving did not become ready within {self.startup_timeout_s:.0f} s", self.log_path
        )

    def __exit__(self, *exc: object) -> None:
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)

    def wait(self) -> None:
        if self.process is not None:
            self.process.wait()

    def predict(self, image: bytes, *, version: int | None = None) -> tuple[int, int | None, str]:
        """A TF Serving REST prediction (pinned to ``version`` when given): status, X-Model-Version, body."""
        import base64

        import httpx

        path = f"/v1/models/{self.settings.model_name}" + (f"/versions/{version}" if version else "")
        body = {"instances": [{"b64": base64.b64encode(image).decode("ascii")}]}
        try:
            answer = httpx.post(f"{self.url}{path}:predict", json=body, timeout=60)
        except httpx.HTTPError as error:
            return 0, None, f"{type(error).__name__}: {error}"
        header = answer.headers.get(MODEL_VERSION_HEADER, "")
        return answer.status_code, int(header) if header.isdigit() else None, answer.text[:200]

    def unpinned_version(self, image: bytes) -> int | None:
        """The version that answers an unpinned prediction (its ``X-Model-Version`` header)."""
        status, answered, _ = self.predict(image)
        return answered if status == 200 else None

    def wait_for_unpinned(self, version: int, image: bytes, *, timeout_s: float = 120.0) -> int:
        """Wait until unpinned predictions are answered by ``version``; a clear error after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last = (0, None, "no answer yet")
        while time.monotonic() < deadline:
            last = self.predict(image)
            if last[0] == 200 and last[1] == version:
                return version
            time.sleep(0.5)
        raise _serving_error(
            f"unpinned predictions were not answered by version {version} within {timeout_s:.0f} s (last: "
            f"HTTP {last[0]}, {MODEL_VERSION_HEADER}: {last[1]}, {last[2]!r}); serving must answer the "
            "version named by the live pointer",
            self.log_path,
        )

    def wait_for_pinned(self, version: int, image: bytes, *, timeout_s: float = 120.0) -> int:
        """Wait until ``/versions/<version>:predict`` answers; a clear error after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last = (0, None, "no answer yet")
        while time.monotonic() < deadline:
            last = self.predict(image, version=version)
            if last[0] == 200 and last[1] in (None, version):
                return version
            time.sleep(0.5)
        raise _serving_error(
            f"/versions/{version}:predict did not answer within {timeout_s:.0f} s (last: HTTP {last[0]}, "
            f"{last[2]!r}); serving must load a published candidate for pinned requests",
            self.log_path,
        )

    def classify(self, image: bytes) -> dict[str, Any]:
        import httpx

        answer = httpx.post(
            f"{self.url}/classify", files={"file": ("sample.jpg", image, "image/jpeg")}, timeout=60
        )
        answer.raise_for_status()
        return dict(answer.json())

    def feedback(self, prediction_id: str, label: str) -> dict[str, Any]:
        import httpx

        answer = httpx.post(
            f"{self.url}/feedback", data={"prediction_id": prediction_id, "label": label}, timeout=60
        )
        answer.raise_for_status()
        return dict(answer.json())

    def stats(self) -> dict[str, Any]:
        import httpx

        return dict(httpx.get(f"{self.url}/feedback/stats", timeout=30).json())


def _serving_error(message: str, log_path: Path) -> Exception:
    import storage

    try:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    except OSError:
        tail = "(no log)"
    return storage.TfloopError(f"{message}; its log {log_path} ends with:\n{tail}")


def register(app: typer.Typer) -> None:
    """Add ``tfloop demo`` to app."""
    app.command("demo")(demo)
