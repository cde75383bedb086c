"""Checks of TensorRT engines against this machine and against the manifest."""
from __future__ import annotations

from tcgraph.errors import TcgraphError
from tcgraph.export.specs import VariantSpec
from tcgraph.runtime.trt.common import REBUILD_HINT, dtype_name, release


def check_engines(section: dict | None, *, tensorrt_version: str, device_name: str, compute_capability: str) -> None:
    """Refuse engines built without TensorRT, by another TensorRT release or on another GPU.

    `section` is `Artifact.tensorrt` (see build.py); the keyword arguments describe this machine.
    Engines are never rebuilt silently: the message says how to rebuild them here.
    """
    if not section:
        raise TcgraphError(
            "this artifact was built without TensorRT engines (manifest.json has no 'tensorrt' section); "
            "re-run `tcgraph transform ... --backend trt` on a machine with TensorRT and an NVIDIA GPU, "
            "or sample with `--backend ort` / `--backend torch`"
        )
    try:
        built_version = str(section["tensorrt_version"])
        built_name = str(section["device"]["name"])
        built_cc = str(section["device"]["compute_capability"])
    except (KeyError, TypeError) as e:
        raise TcgraphError(
            f"the 'tensorrt' section of manifest.json lacks {e} (tensorrt_version, device.name, "
            f"device.compute_capability); the artifact is damaged: {REBUILD_HINT}"
        ) from e
    differences = []
    if release(built_version) != release(tensorrt_version):
        differences.append(f"TensorRT {release(built_version)} built them, this machine has TensorRT "
                           f"{release(tensorrt_version)}")
    if built_name != device_name or built_cc != compute_capability:
        differences.append(f"they were built on the GPU {built_name!r} (compute capability {built_cc}), this machine "
                           f"has {device_name!r} (compute capability {compute_capability})")
    if differences:
        raise TcgraphError(f"the TensorRT engines of this artifact do not fit this machine: {'; '.join(differences)}; "
                           f"{REBUILD_HINT}")


def check_engine_io(engine, spec: VariantSpec, *, input_mode) -> None:
    """The engine's I/O tensors must be the manifest's: names, directions, shapes, dtypes.

    `input_mode` is `trt.TensorIOMode.INPUT` (what `engine.get_tensor_mode` answers for inputs).
    """
    want = {i.name: ("input", list(i.shape), i.dtype) for i in spec.inputs}
    want.update({o.onnx_name: ("output", list(o.shape), o.dtype) for o in spec.outputs})
    got = {}
    for k in range(engine.num_io_tensors):
        name = engine.get_tensor_name(k)
        mode = "input" if engine.get_tensor_mode(name) == input_mode else "output"
        got[name] = (mode, [int(d) for d in engine.get_tensor_shape(name)], dtype_name(engine.get_tensor_dtype(name)))
    if got != want:
        diff = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
        details = ", ".join(f"{n}: engine {got.get(n, 'absent')} vs manifest {want.get(n, 'absent')}" for n in diff)
        raise TcgraphError(
            f"the TensorRT engine of variant {spec.id} does not match manifest.json ({details}); the engine was "
            f"built from other ONNX files: {REBUILD_HINT}"
        )
