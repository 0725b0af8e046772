"""Model-directory reading and ONNX Runtime session set-up, shared by CrossEncoder and the tooling."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from .errors import ModelError

log = logging.getLogger("tailrank")

_T = TypeVar("_T")

# Model types whose position ids start at pad_token_id + 1 (fairseq heritage): the usable length
# is max_position_embeddings - pad_token_id - 1.
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "data2vec-text", "longformer"})
# tokenizer_config's "no limit" sentinel is int(1e30); anything this large means unset.
_NO_LIMIT = 10**9


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Reads a JSON object, turning every failure into a ModelError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{what} is missing: {path}") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{what} is not valid JSON ({path}): {e}") from e
    if not isinstance(obj, dict):
        raise ModelError(f"{what} must hold a JSON object: {path}")
    return obj


def find_onnx(model_dir: Path) -> Path:
    """The model's ONNX graph: ``onnx/model.onnx`` or ``model.onnx``."""
    if not model_dir.is_dir():
        raise ModelError(f"model directory not found: {model_dir}")
    for rel in ("onnx/model.onnx", "model.onnx"):
        if (model_dir / rel).is_file():
            return model_dir / rel
    raise ModelError(
        f"no ONNX model in {model_dir} (looked for onnx/model.onnx and model.onnx); "
        "make one with `tailrank export HF_MODEL_DIR OUT_DIR`"
    )


def position_limit(config: dict[str, Any]) -> int | None:
    """Longest sequence the model's position embeddings allow, or None if the config does not say."""
    n = config.get("max_position_embeddings")
    if not isinstance(n, int) or n <= 0:
        return None
    if config.get("model_type") in _OFFSET_POSITIONS:
        pad = config.get("pad_token_id")
        n -= (pad if isinstance(pad, int) else 1) + 1
    return n


def default_max_length(config: dict[str, Any], tokenizer_config: dict[str, Any]) -> int:
    """The tokenizer's ``model_max_length`` capped by the model's positions (512 if neither says)."""
    limit = position_limit(config)
    tok = tokenizer_config.get("model_max_length")
    tok_max = int(tok) if isinstance(tok, (int, float)) and 0 < tok < _NO_LIMIT else None
    candidates = [v for v in (tok_max, limit) if v is not None]
    return min(candidates) if candidates else 512


def cpu_quota() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup CPU quota (v2 or v1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        parts = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if len(parts) == 2 and parts[0] != "max":
            return int(parts[0]) / int(parts[1])
        return None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def session_options(threads: int | None, *, spin: bool = True) -> Any:
    """SessionOptions chosen for low-latency scoring of dynamic shapes on a bounded CPU budget.

    ``spin=False`` stops idle intra-op threads from busy-waiting between ops and calls: a little
    slower per call, but it leaves the CPU to other work in the process (a server's event loop)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads if threads is not None else cpu_quota()
    so.inter_op_num_threads = 1  # one sequential graph: parallelism lives inside the kernels
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Memory patterns are cached per input shape; every batch has its own (rows, length), so the
    # cache would only grow. The arena stays on: it reuses blocks across calls, and its peak is
    # bounded by the largest batch, which the warm-up allocates at load.
    so.enable_mem_pattern = False
    so.enable_cpu_mem_arena = True
    so.log_severity_level = 3  # errors only: ORT's warnings go to stderr, not to our logger
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


DEVICES = ("auto", "cpu", "cuda", "openvino")
# Inference precisions a model directory may ask of the OpenVINO provider (``tailrank.json``).
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
RUNTIME_FILE = "tailrank.json"


def openvino_available() -> bool:
    """Whether this onnxruntime has the OpenVINO execution provider (the onnxruntime-openvino wheel)."""
    import onnxruntime as ort

    return "OpenVINOExecutionProvider" in ort.get_available_providers()


def choose_providers(device: str, *, threads: int | None = None, precision: str = "fp32") -> tuple[list[Any], str]:
    """Execution providers for ``device`` ("auto", "cpu", "cuda", "openvino") and the device
    actually used. ``precision`` is the OpenVINO provider's inference precision ("fp32" or
    "bf16": bf16 matmuls over the fp32 graph, on CPUs with AVX512-BF16 or AMX)."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ValueError(f'device must be "auto", "cpu", "cuda" or "openvino", got {device!r}')
    if device == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    if device == "openvino":
        if openvino_available():
            # Explicit f32 too: OpenVINO's CPU default is bf16 on AMX machines.
            props = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[precision],
                     "INFERENCE_NUM_THREADS": str(threads if threads is not None else cpu_quota())}
            return [("OpenVINOExecutionProvider", {"device_type": "CPU", "load_config": json.dumps({"CPU": props})}),
                    "CPUExecutionProvider"], "openvino"
        log.warning("tailrank: OpenVINO is not available to onnxruntime (install onnxruntime-openvino in place of "
                    "onnxruntime); scoring in fp32 on the CPU provider")
        return ["CPUExecutionProvider"], "cpu"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        _preload_cuda(ort)
        # TF32 (on by default in ORT on Ampere and later) rounds fp32 matmul inputs to 10-bit
        # mantissas: logits then drift by ~3e-4 from the CPU's. fp32 models stay exact; use an
        # fp16 model (`tailrank optimize --fp16`) for tensor-core speed.
        return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"], "cuda"
    level = logging.WARNING if device == "cuda" else logging.INFO
    log.log(level, "tailrank: CUDA is not available to onnxruntime (install onnxruntime-gpu); scoring on the CPU")
    return ["CPUExecutionProvider"], "cpu"


_preloaded = False


def _preload_cuda(ort: Any) -> None:
    """Loads CUDA and cuDNN from the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) or torch, once,
    so the CUDA provider finds them without LD_LIBRARY_PATH (onnxruntime >= 1.21)."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except Exception as e:  # best effort: the libraries may be on the loader path anyway
        log.debug("tailrank: onnxruntime.preload_dlls failed: %s", e)


Priority = Union[int, Literal["idle"]]


def check_priority(value: Any, name: str = "nice") -> Priority:
    """A thread priority below the caller's: nice steps (an int in [0, 19]) or ``"idle"``."""
    if value == "idle":
        return "idle"
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 19:
        raise ValueError(f'{name} must be an int in [0, 19] (nice steps) or "idle", got {value!r}')
    return value


def lowers_priority(priority: Priority) -> bool:
    return priority == "idle" or int(priority) > 0


def lower_thread_priority(steps: Priority) -> bool:
    """Lowers the calling thread's priority: ``steps`` (an int) adds to its nice value, up to 19;
    ``"idle"`` moves it to Linux's SCHED_IDLE class, below every nice value. Linux schedules
    threads, not processes: only this thread and the threads it creates from now on run at the
    lower priority. An unprivileged thread cannot raise its priority again.

    Why "idle" exists: a nice value lowers a thread's share of the CPU, but a thread that wakes
    while every CPU runs niced work may still wait for the running thread's time slice (event-loop
    wake-ups 2-8 ms late were measured here with the scorer at nice 10); a waking thread of the
    normal class preempts a SCHED_IDLE one at once. SCHED_IDLE threads run only on CPU time no
    normal thread wants, so other busy processes on the machine starve them.

    Returns whether it took effect (False for ``0``, on other systems, or where the system refuses).
    """
    if not lowers_priority(steps) or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    if steps == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
            return True
        except (AttributeError, OSError) as e:
            log.debug("tailrank: cannot move thread %d to SCHED_IDLE (%s); lowering its nice value", tid, e)
            steps = 19
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except OSError as e:
        log.debug("tailrank: cannot lower the priority of thread %d: %s", tid, e)
        return False
    return True


def call_with_lower_priority(fn: Callable[[], _T], steps: Priority) -> _T:
    """Runs ``fn`` on a short-lived thread of priority lowered by ``steps`` (see
    :func:`lower_thread_priority`) and returns its result (or raises its exception). Threads that
    ``fn`` starts inherit that priority: that is how ONNX Runtime's intra-op pool, created with the
    session, ends up below a server's event loop."""
    if not lowers_priority(steps):
        return fn()
    out: dict[str, Any] = {}

    def target() -> None:
        lower_thread_priority(steps)
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            out["error"] = e

    t = threading.Thread(target=target, name="tailrank-session-init")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


# CPU flags that give a precision its fast kernels (any one of them is enough): int8 dot products
# (VNNI on AVX-512 or AVX2, AMX, Arm dot product) and bf16 arithmetic (AVX512-BF16, AMX).
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp"),
    "bf16": ("avx512_bf16", "amx_bf16"),
}


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo "flags" or "Features"; empty where unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def read_runtime(model_dir: Path) -> dict[str, Any]:
    """The model directory's run-time settings (``tailrank.json``, written by ``tailrank optimize
    --bf16`` or ``--auto``): ``device`` and ``precision``, and for a model tuned for one ISA,
    ``requires_cpu_flags`` (any one of them) and ``fallback`` (a graph of the directory for CPUs
    without them); ``{}`` without the file. Everything is validated: the file is untrusted."""
    path = model_dir / RUNTIME_FILE
    if not path.is_file():
        return {}
    cfg = read_json(path, RUNTIME_FILE)
    device, precision = cfg.get("device", "auto"), cfg.get("precision", "fp32")
    if device not in DEVICES or precision not in OPENVINO_PRECISIONS:
        raise ModelError(f"{path}: device must be one of {list(DEVICES)} and precision one of "
                         f"{sorted(OPENVINO_PRECISIONS)}, got {device!r} and {precision!r}")
    out: dict[str, Any] = {"device": device, "precision": precision}
    flags = cfg.get("requires_cpu_flags")
    if flags is not None:
        if not isinstance(flags, list) or not flags or not all(isinstance(f, str) and f.isprintable() for f in flags):
            raise ModelError(f"{path}: requires_cpu_flags must be a non-empty list of flag names, got {flags!r}")
        out["requires_cpu_flags"] = list(flags)
    fb = cfg.get("fallback")
    if fb is not None:
        rel = fb.get("onnx") if isinstance(fb, dict) else None
        fb_device, fb_precision = (fb.get("device", "cpu"), fb.get("precision", "fp32")) if isinstance(fb, dict) else (None, None)
        if (not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts
                or fb_device not in DEVICES or fb_precision not in OPENVINO_PRECISIONS):
            raise ModelError(f"{path}: fallback must be {{\"onnx\": a relative path inside the directory, \"device\", "
                             f"\"precision\"}}, got {fb!r}")
        if not (model_dir / rel).is_file():
            raise ModelError(f"{path}: the fallback graph {rel} is missing")
        out["fallback"] = {"onnx": rel, "device": fb_device, "precision": fb_precision}
    return out


_isa_warned: set[tuple[str, str]] = set()
_isa_lock = threading.Lock()


def isa_fallback(model_dir: Path, runtime: dict[str, Any], flags: frozenset[str]) -> dict[str, Any] | None:
    """For a model tuned for an ISA this CPU lacks (none of ``requires_cpu_flags`` in ``flags``):
    its fallback settings (``onnx`` path, ``device``, ``precision``), or None to run it as it is
    (it still works, slower) when it has no fallback. Logs once per directory and process."""
    need = runtime.get("requires_cpu_flags")
    if not need or flags & set(need):
        return None
    fb = runtime.get("fallback")
    key = (str(model_dir.resolve()), ",".join(need))
    with _isa_lock:
        first = key not in _isa_warned
        _isa_warned.add(key)
    if first:
        what = (f"scoring its fallback graph {fb['onnx']} ({fb['device']}, {fb['precision']}) instead" if fb else
                "it has no fallback graph, so it runs as it is, likely slower than fp32")
        log.warning("tailrank: %s was tuned for a CPU with %s, which this CPU lacks; %s", model_dir,
                    " or ".join(need), what)
    return fb


def load_session(
    path: Path, *, device: str = "cpu", threads: int | None = None, spin: bool = True, nice: Priority = 0,
    precision: str = "fp32",
) -> tuple[Any, str]:
    """An InferenceSession for the ONNX graph at ``path``; invalid graphs raise ModelError.

    ``nice`` (nice steps > 0, or ``"idle"``) creates the session on a thread of lower priority, so
    that ONNX Runtime's own intra-op threads (started with the session) run below the caller (Linux)."""
    import onnxruntime as ort

    providers, used = choose_providers(device, threads=threads, precision=precision)
    so = session_options(threads, spin=spin)
    try:
        session = call_with_lower_priority(
            lambda: ort.InferenceSession(str(path), sess_options=so, providers=providers), nice
        )
    except Exception as e:  # ORT's exceptions are its own pybind types (InvalidGraph, Fail, ...)
        raise ModelError(f"ONNX Runtime cannot load {path}: {e}") from e
    if used == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        log.warning("tailrank: the CUDA execution provider failed to initialise; scoring on the CPU")
        used = "cpu"
    if used == "openvino" and "OpenVINOExecutionProvider" not in session.get_providers():
        log.warning("tailrank: the OpenVINO execution provider failed to initialise; scoring in fp32 on the CPU")
        used = "cpu"
    return session, used


def file_fingerprint(*paths: Path) -> str:
    """Hex sha256 over the bytes of ``paths`` (in order, each prefixed by its size): identifies a
    model's weights and tokenizer, e.g. in a Collection's manifest."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --- text-model graph signatures (CrossEncoder and Embedder) ---------------------------------

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
ORT_INT: dict[str, Any] = {"tensor(int64)": "int64", "tensor(int32)": "int32"}
ORT_FLOAT: dict[str, Any] = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def text_inputs(session: Any, onnx_path: Path, what: str) -> tuple[tuple[str, ...], str]:
    """The graph's text inputs (in ``TEXT_INPUTS`` order; token_type_ids optional) and their one
    integer dtype name ("int64" or "int32"); anything else raises ModelError naming ``what``."""
    inputs = {i.name: i for i in session.get_inputs()}
    unknown = sorted(set(inputs) - set(TEXT_INPUTS))
    if unknown:
        raise ModelError(f"{onnx_path} has inputs {unknown}; a {what} takes only {list(TEXT_INPUTS)}")
    for required in ("input_ids", "attention_mask"):
        if required not in inputs:
            raise ModelError(f"{onnx_path} has no {required} input; not a text {what}")
    dtypes = {i.type for i in inputs.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in ORT_INT:
        raise ModelError(f"{onnx_path} inputs must all be int64 or all int32, got {sorted(dtypes)}")
    return tuple(n for n in TEXT_INPUTS if n in inputs), ORT_INT[next(iter(dtypes))]


def cache_root() -> Path:
    """tailrank's cache directory: ``$TAILRANK_CACHE``, else ``~/.cache/tailrank``."""
    env = os.environ.get("TAILRANK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tailrank"
