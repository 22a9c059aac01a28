"""A user's own teacher: a state_dict for any registered model (torchvision's `tv:<name>` included), a torch.export
program (`.pt2`, written by torch.export.save), or a TorchScript file (still read; deprecated upstream).

What loading may run, by format:
- state_dict: weights-only (engine.atomic.load_torch); a file that needs pickled code is refused.
- `.pt2`: torch.export.load is NOT a weights-only loader (torch 2.14: torch/export/pt2_archive/_package.py and
  torch/_export/serde/serialize.py). It unpickles weights and constants the archive marks `use_pickle`
  (torch.load(weights_only=False)), opaque constants (pickle.loads) and torchbind objects; for sample inputs that the
  weights-only unpickler refuses it falls back to weights_only=False; it loads AOTInductor shared libraries packed in
  the archive; it parses shape expressions with sympy.sympify (eval); it resolves each graph node's target by name on
  the torch module; and `.module()` compiles the archive's `guards_code` into Python. Torch's own docstring says it:
  "Never load data from an untrusted source". So `vet_exported_program` reads the archive first, as data, and
  refuses each of those routes (see there); only an archive that passes is handed to torch.export.load.
- TorchScript: torch.jit.load (TorchScript code, not pickled Python). torch.jit is deprecated in favour of
  torch.export: importing one warns once, in our words (logged by engine.distill), and torch's own FutureWarning
  is left to show, not hidden.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from engine.errors import CheckpointError

TORCHSCRIPT, EXPORT = "torchscript", "export"


def _members(z: zipfile.ZipFile) -> dict[str, str]:
    """Archive path (below its one top-level folder) -> the name in the zip."""
    out = {}
    for name in z.namelist():
        root, sep, rest = name.partition("/")
        out[rest if sep else name] = name
    return out


def _is_export_archive(z: zipfile.ZipFile) -> bool:
    members = _members(z)
    return ("archive_format" in members and any(m.startswith("models/") for m in members)
            and z.read(members["archive_format"]).strip() == b"pt2")


def checkpoint_format(path: str | Path) -> str:
    """'export' for a torch.export archive (a zip with `archive_format` = pt2 and `models/*.json` under its folder),
    'torchscript' for a TorchScript archive (`code/`, `constants.pkl`), 'state_dict' for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if _is_export_archive(z):
                return EXPORT
            if any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist()):
                return TORCHSCRIPT
    return "state_dict"


# ---------------------------------------------------------------- torch.export programs

# The members torch.export.save writes for a model without torchbind or opaque objects (under the archive's
# folder); any other member (pickled legacy weights, AOTInductor libraries, ExecuTorch, ...) is refused.
_ALLOWED = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
                      r"models/\w+\.json|data/weights/\w+_weights_config\.json|data/weights/weight_\d+|"
                      r"data/constants/\w+_constants_config\.json|data/constants/tensor_\d+|"
                      r"data/sample_inputs/\w+\.pt|extra/[\w.\-]+)")
# A node's target: an ATen or prims operator, or Python's own arithmetic on sizes. Anything else (torch.<anything>
# resolves by getattr, e.g. to torch.load) is refused.
_TARGET = re.compile(r"torch\.ops\.(aten|prims)\.\w+\.\w+|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|neg|pow"
                     r"|eq|ne|lt|le|gt|ge|and_|or_|not_)|torch\.sym_(max|min|not|float|int|ite|sqrt|sum)")
_TOKEN = re.compile(r"\s+|'[a-z]+\d+'|[A-Za-z_]\w*|\d+(?:\.\d+)?(?:e[-+]?\d+)?|\*\*|//|[-+*/%(),=<>!&|~]")
_SYMPY = {"Symbol", "Integer", "Rational", "Float", "True", "False", "positive", "integer", "real", "nonnegative",
          "finite", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Add", "Mul", "Pow",
          "oo", "floor", "ceiling"}
# A guard compares sizes with integers: L['x'].size()[0] <= 65536
_GUARD_PARTS = re.compile(r"L\['\w+'\]|\.(size|stride|storage_offset)\(\)|\[\d+\]|\band\b|\bor\b|\bnot\b")
_GUARD_REST = re.compile(r"[\d\s()<>=!+\-*/%]*")


def _safe_expression(expr: str) -> bool:
    """Only sympy's constructors, torch's sympy functions, symbol names (s0, u1) and arithmetic: no attribute
    access, subscript or other name that sympy's eval could reach anything through."""
    import torch.utils._sympy.functions as fns

    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            return False
        token, pos = m.group(), m.end()
        if re.fullmatch(r"[A-Za-z_]\w*", token) and not (
                token in _SYMPY or re.fullmatch(r"[a-z]+\d+", token)
                or (token[0].isupper() and isinstance(getattr(fns, token, None), type))):
            return False
    return True


def _walk(obj, found: dict[str, list]) -> None:
    if isinstance(obj, dict):
        if isinstance(obj.get("target"), str) and "inputs" in obj:
            found["targets"].append(obj["target"])
        if isinstance(obj.get("expr_str"), str):
            found["expressions"].append(obj["expr_str"])
        for v in obj.values():
            _walk(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _walk(v, found)


def vet_exported_program(path: str | Path) -> None:
    """Refuses a `.pt2` that torch.export.load would run code from (the module's docstring): members outside what
    torch.export.save writes for a plain model; weights or constants stored as pickles; torchbind or opaque objects;
    sample inputs the weights-only unpickler refuses; a graph node that calls anything but an operator; a shape
    expression or guard that is more than names, numbers and arithmetic."""
    def refuse(why: str):
        raise CheckpointError(f"{path}: refused as a torch.export program: {why}; export the model again with "
                              "torch.export.export(model.eval(), ...) and torch.export.save")

    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable torch.export archive ({e})") from None
    with z:
        if not _is_export_archive(z):
            refuse("no archive_format 'pt2' and models/*.json")
        members = _members(z)
        if len({n.partition("/")[0] for n in z.namelist()}) != 1:
            refuse("more than one top-level folder")
        odd = sorted(m for m in members if not _ALLOWED.fullmatch(m))
        if odd:
            refuse(f"unexpected members {odd[:3]}")
        if "models/model.json" not in members:
            refuse("no models/model.json")
        for name, member in members.items():
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                config = json.loads(z.read(member)).get("config", {})
                pickled = [k for k, v in config.items() if v.get("use_pickle")
                           or not str(v.get("path_name", "")).startswith(("weight_", "tensor_"))]
                if pickled:
                    refuse(f"{name} stores {pickled[:3]} as pickles or objects")
            elif name.startswith("data/sample_inputs/"):
                try:  # torch.export.load tries weights-only first and falls back to full unpickling on failure
                    torch.load(io.BytesIO(z.read(member)), weights_only=True)
                except Exception as e:
                    refuse(f"{name} needs more than the weights-only unpickler ({type(e).__name__})")
            elif name.startswith("models/"):
                program = json.loads(z.read(member))
                found: dict[str, list] = {"targets": [], "expressions": []}
                _walk(program, found)
                bad = sorted({t for t in found["targets"] if not _TARGET.fullmatch(t)})
                if bad:
                    refuse(f"its graph calls {bad[:3]}")
                bad = [e for e in found["expressions"] + list(program.get("range_constraints", {}))
                       if not _safe_expression(e)]
                if bad:
                    refuse(f"shape expressions {bad[:2]}")
                bad = [g for g in program.get("guards_code", []) if not _GUARD_REST.fullmatch(_GUARD_PARTS.sub("", g))]
                if bad:
                    refuse(f"guards {bad[:2]}")
                if program.get("graph_module", {}).get("graph", {}).get("custom_obj_values"):
                    refuse("torchbind objects")


_TRAINING_MODE = {"aten.batch_norm.default": 5, "aten._native_batch_norm_legit.default": 5,
                  "aten._native_batch_norm_legit_functional.default": 5, "aten.dropout.default": 2,
                  "aten.native_dropout.default": 2}


class ExportedModule(nn.Module):
    """A torch.export program as a module. Its mode was fixed when it was exported (BatchNorm's running statistics,
    no dropout), so train() and eval() set the flag only: torch's unlifted module refuses both."""

    arch = EXPORT

    def __init__(self, program: torch.export.ExportedProgram):
        super().__init__()
        self.program = program.module()
        self._exported = [program]  # in a list: not a submodule; torch.export.save writes it back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> "ExportedModule":
        self.training = mode
        return self

    def save(self, path: str | Path) -> None:
        """The program as imported, with this module's current weights: `.module()` shares the program's tensors,
        so fine-tuning changed them in the program too (tests/test_own_data.py checks the kept file)."""
        from engine.atomic import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.export.save(self._exported[0], f)


def load_exported(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A vetted `.pt2` (vet_exported_program), loaded with torch.export.load(...).module(). One exported in training
    mode (BatchNorm on batch statistics, live dropout) is refused: a teacher must give the same answer for an image
    in any batch."""
    vet_exported_program(path)
    try:
        with open(path, "rb") as f:  # a buffer: torch.export.load wants a name ending in .pt2 otherwise
            program = torch.export.load(f)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable torch.export program ({first})") from None
    for node in program.graph.nodes:
        index = _TRAINING_MODE.get(str(node.target))
        if index is not None and len(node.args) > index and node.args[index] is True:
            raise CheckpointError(f"{path}: exported in training mode ({node.target} with training=True); "
                                  "export model.eval() instead")
    return ExportedModule(program).to(device)


# ---------------------------------------------------------------- TorchScript

TORCHSCRIPT_DEPRECATED = ("{path}: a TorchScript teacher is read, but TorchScript is deprecated upstream (torch.jit, "
                          "since torch 2.5) and may stop loading in a later torch; export the teacher with "
                          "torch.export.export(model.eval(), (images,), dynamic_shapes=({{0: torch.export.Dim('batch')}},)) "
                          "and torch.export.save(program, 'teacher.pt2'), and import that instead")


def load_torchscript(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """torch.jit.load, which torch 2.14 deprecates with a FutureWarning: that warning is not hidden here (Python
    shows it once per process). Ours, which says what to do instead, is logged where the teacher is imported
    (engine.distill), once per pipeline run, not at each later load of the kept copy."""
    try:
        model = torch.jit.load(str(path), map_location=device)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable TorchScript file ({first})") from None
    model.arch = TORCHSCRIPT
    return model


@torch.no_grad()
def check_fits(model: nn.Module, input_shape: tuple[int, int, int], classes: list[str], source: str) -> None:
    """One forward pass on a blank batch: a teacher that cannot take the data set's images, or
    predicts another number of classes, is refused with both sides named."""
    was = model.training
    model.eval()
    c, h, w = input_shape
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        out = model(torch.zeros(2, c, h, w, device=device))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{source}: the teacher does not accept the data set's {c}x{h}x{w} images ({first}); "
                              "set data.image_size and data.channels to what it was trained on") from None
    finally:
        model.train(was)
    if out.dim() != 2 or out.shape[1] != len(classes):
        got = tuple(out.shape[1:])
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise CheckpointError(f"{source}: the teacher outputs {got} per image, but the data set has {len(classes)} "
                              f"classes ({shown}); a teacher must be trained on the same classes, in the same order")


# ---------------------------------------------------------------- an imported program, kept as it came

PROGRAM_FILES = {EXPORT: "model.pt2", TORCHSCRIPT: "model.ts"}  # in the teacher's model folder, beside model.pt


def load_program(kind: str, path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A teacher of any architecture, by its format: a torch.export program or a TorchScript file."""
    return (load_exported if kind == EXPORT else load_torchscript)(path, device)


def save_program(model: nn.Module, path: str | Path) -> None:
    """An imported program written back in its own format, with its current weights (fine-tuning changes them)."""
    from engine.atomic import atomic_path

    if model.arch == EXPORT:
        model.save(path)
        return
    with atomic_path(path) as tmp:
        torch.jit.save(model, str(tmp))
