"""An importance matrix for llama.cpp's quantizer, from the user's own rows: the activations each weight sees.

A k-quant picks, per block of weights, the scale that minimises the rounding error; without an importance matrix
every column of a weight counts the same. llama.cpp's ``llama-imatrix`` measures how large each input column's
activation is on calibration text (the mean of x_j^2 over tokens, per weight matrix) and ``llama-quantize
--imatrix`` weights the error by it, so the columns the model leans on keep their precision (Unsloth's and
bartowski's low-bit GGUFs are made so). Running ``llama-imatrix`` needs a llama.cpp build with its tools; the
model is in PyTorch already, so the same sums are taken here with forward pre-hooks on every ``nn.Linear`` of the
decoder blocks (llama.cpp's default: not ``output.weight``), named as the GGUF names the weight, and handed to
``llama_model_quantize`` through its C array (``llama_model_imatrix_data``). The file written beside the GGUF is
llama.cpp's own GGUF imatrix format (``<tensor>.in_sum2``, ``<tensor>.counts``, ``imatrix.*`` keys), so
``llama-quantize --imatrix`` reads it, and ``--imatrix FILE`` here reads one ``llama-imatrix`` wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwcompat.errors import InputError

#: llama-imatrix's default context (its chunk size), recorded in the file as it does.
CHUNK_SIZE = 512
#: Rows read for the statistics and tokens kept per row: enough for stable column means on 1-14B models (llama.cpp's
#: guidance is a few hundred chunks of text at most) while an export on a CPU stays minutes.
MAX_ROWS = 256
MAX_ROW_TOKENS = 1024


@dataclass(frozen=True)
class ImportanceMatrix:
    """Per GGUF weight name: the sum over tokens of each input column's squared activation, and the token count."""

    sums: dict[str, Any]  # name -> float32 array (in_features,)
    counts: dict[str, int]
    datasets: tuple[str, ...]
    chunk_size: int = CHUNK_SIZE

    @property
    def tokens(self) -> int:
        return max(self.counts.values(), default=0)

    @property
    def chunks(self) -> int:
        return self.tokens // self.chunk_size

    def values(self) -> dict[str, Any]:
        """What the quantizer weights by: the mean squared activation per column (llama-quantize's normalisation;
        a weight no token reached counts every column alike)."""
        import numpy as np

        return {name: (s / self.counts[name] if self.counts[name] > 0 else np.ones_like(s)).astype(np.float32)
                for name, s in self.sums.items()}

    def summary(self, path: Path | None = None) -> dict[str, Any]:
        return {"file": str(path) if path else None, "entries": len(self.sums), "tokens": self.tokens,
                "chunks": self.chunks, "chunk_size": self.chunk_size, "datasets": list(self.datasets)}


def collect(model_dir: str | Path, token_rows: list[list[int]], dataset: str, progress=print) -> ImportanceMatrix:
    """Run the merged model over ``token_rows`` (each its own sequence, as the user's prompts reach it) and sum
    every decoder ``nn.Linear``'s squared inputs per column."""
    import torch

    from hwcompat import hfload

    model = hfload.causal_lm(model_dir, dtype="auto")
    model.eval()
    names = gguf_names(Path(model_dir), model)
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names.values(), 0)

    def hook(name):
        def pre(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums[name] + x.square().sum(0) if name in sums else x.square().sum(0)
            counts[name] += x.shape[0]
        return pre

    handles = [m.register_forward_pre_hook(hook(names[n])) for n, m in model.named_modules() if n in names]
    try:
        with torch.no_grad():
            for i, ids in enumerate(token_rows):
                if i % 32 == 0:
                    progress(f"imatrix: row {i + 1} of {len(token_rows)}")
                model(input_ids=torch.tensor([ids[:MAX_ROW_TOKENS]]))
    finally:
        for h in handles:
            h.remove()
    return ImportanceMatrix({n: s.numpy() for n, s in sums.items()}, counts, (dataset,))


def gguf_names(model_dir: Path, model) -> dict[str, str]:
    """Module name -> the GGUF name of its weight, for the decoder blocks' linear layers."""
    import gguf
    import torch

    from hwcompat.export.archs import ARCHS
    from hwcompat.userfile import read_json_object

    cfg = read_json_object(model_dir / "config.json", "model config")
    arch = ARCHS[cfg["model_type"]]
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf), int(cfg["num_hidden_layers"]))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            new = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
            if new and new.startswith("blk."):
                out[name] = new
    return out


def write(path: Path, im: ImportanceMatrix) -> None:
    """llama.cpp's GGUF imatrix file (what ``llama-imatrix -o FILE.gguf`` writes), in sorted tensor order."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "imatrix")
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, list(im.datasets))
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, im.chunks)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, im.chunk_size)
    for name in sorted(im.sums):
        writer.add_tensor(f"{name}.in_sum2", np.asarray(im.sums[name], np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[im.counts[name]]], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path: str | Path) -> ImportanceMatrix:
    """A GGUF imatrix file (``llama-imatrix`` or an earlier export); dense weights only (one count each)."""
    import gguf
    import numpy as np

    path = Path(path)
    legacy = f"{path}: not a GGUF imatrix file; a legacy .dat converts with `llama-imatrix --in-file {path.name} -o "
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise InputError(f"{legacy}{path.stem}.gguf` ({exc}). Or drop FILE: --imatrix computes one") from None
    field = reader.fields.get(gguf.Keys.IMatrix.DATASETS)
    datasets = tuple(field.contents()) if field is not None else (str(path),)
    tensors = {t.name: np.asarray(t.data, np.float32).reshape(-1) for t in reader.tensors}
    sums = {n[:-len(".in_sum2")]: v for n, v in tensors.items() if n.endswith(".in_sum2")}
    if not sums or any(f"{n}.counts" not in tensors for n in sums):
        raise InputError(f"{path}: no <tensor>.in_sum2 / <tensor>.counts pairs; give an imatrix file llama-imatrix "
                         "or `hwcompat export --imatrix` wrote")
    if any(tensors[f"{n}.counts"].size != 1 for n in sums):
        raise InputError(f"{path}: per-expert counts (a mixture-of-experts model); hwcompat exports dense models")
    bad = next((n for n, v in sums.items() if not np.isfinite(v).all()), None)
    if bad:
        raise InputError(f"{path}: {bad} holds a NaN or infinity; recompute the importance matrix")
    counts = {n: int(round(float(tensors[f"{n}.counts"][0]))) for n in sums}
    chunk = reader.fields.get(gguf.Keys.IMatrix.CHUNK_SIZE)
    return ImportanceMatrix(sums, counts, datasets, int(chunk.contents()) if chunk is not None else CHUNK_SIZE)


def check_sizes(im: ImportanceMatrix, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Every entry names a weight of this model with as many columns: llama.cpp aborts the quantization otherwise."""
    for name, s in im.sums.items():
        if name in shapes and shapes[name][-1] != len(s):
            raise InputError(f"{source}: {name} has {len(s)} columns, the model's weight {shapes[name][-1]}: this "
                             "importance matrix is another model's; drop FILE (--imatrix computes one)")
    if not set(im.sums) & set(shapes):
        raise InputError(f"{source}: none of its {len(im.sums)} entries names a weight of this model (e.g. "
                         f"{next(iter(im.sums))}); it is another model's")


def calibration(model_dir: str | Path, data: str | None) -> tuple[list[list[int]], str]:
    """Token ids per row, as the model reads them (chat template, then the answer and end of turn), of ``data``'s
    rows (SFT format; up to MAX_ROWS), else of the bundled general prompts; and the dataset's name for the file."""
    from hwcompat import hfload
    from hwcompat.data import GENERAL_PROMPTS, chat as render
    from hwcompat.export.verify import prompts_from

    tok = hfload.tokenizer(model_dir, "model")
    chat = render.uses_chat_template(tok, "auto")
    convs, _ = prompts_from(data, MAX_ROWS)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    rows = [render.render_prompt_ids(tok, c, chat) + tok.encode(c[-1][1], add_special_tokens=False) + eos
            for c in convs]
    return rows, Path(data).name if data else GENERAL_PROMPTS.name


def path_for(gguf_path: str | Path) -> Path:
    """Where an export writes the importance matrix it computed: beside the GGUF, ``NAME.imatrix.gguf``."""
    p = Path(gguf_path)
    return p.with_name(f"{p.stem}.imatrix.gguf")
