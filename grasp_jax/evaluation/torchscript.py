"""Read the tensors of a TorchScript / `torch.save` zip archive into numpy, without torch.

A restricted unpickler: it resolves only the globals that rebuild tensors and plain containers,
and replaces TorchScript module classes (`__torch__.*`) by an inert attribute holder. Nothing in
the archive is executed, so a tampered file can fail to load but cannot run code.
"""
import collections
import pickle
import zipfile

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# TorchScript pickles attribute lists through these helpers; each takes the list itself.
_JIT_LIST_BUILDERS = ("build_intlist", "build_floatlist", "build_boollist", "build_tensorlist",
                      "build_doublelist")


class _Module:
  """Stands in for a pickled TorchScript module: keeps its state, runs none of its code."""

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f"module state is a {type(state).__name__}, expected a dict")
    self.__dict__.update(state)


def _module_class(qualname):
  return type(qualname.rsplit(".", 1)[-1], (_Module,), {"qualname": qualname})


def _to_tree(obj):
  """Pickled modules -> nested dicts of their public attributes (tensors, ints, lists)."""
  if isinstance(obj, _Module):
    return {k: _to_tree(v) for k, v in vars(obj).items()
            if k != "training" and not k.startswith("_")}
  if isinstance(obj, dict):
    return {k: _to_tree(v) for k, v in obj.items()}
  return obj


class _Unpickler(pickle.Unpickler):
  """Accepts tensor-rebuild globals only; storages come from the archive's data/ records."""

  def __init__(self, file, archive, prefix, path):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._path = path
    self._storages = {}
    # Archives written before torch recorded it are little-endian.
    record = f"{prefix}/byteorder"
    order = archive.read(record).decode() if record in archive.namelist() else "little"
    if order not in ("little", "big"):
      raise pickle.UnpicklingError(f"{path}: unknown byteorder {order!r}")
    self._byteorder = "<" if order == "little" else ">"

  def find_class(self, module, name):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return self._rebuild_tensor
    if module == "torch" and name in _STORAGE_DTYPES:
      return name  # Only used as a tag inside persistent ids.
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch.jit._pickle" and name in _JIT_LIST_BUILDERS:
      return list
    if module.startswith("__torch__.") or module == "__torch__":
      return _module_class(f"{module}.{name}")
    raise pickle.UnpicklingError(f"{self._path}: refusing pickled global {module}.{name}")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and pid[1] in _STORAGE_DTYPES):
      raise pickle.UnpicklingError(f"{self._path}: unexpected persistent id {pid!r}")
    _, tag, key, _, numel = pid
    if key not in self._storages:
      record = f"{self._prefix}/data/{key}"
      try:
        raw = self._archive.read(record)
      except KeyError:
        raise pickle.UnpicklingError(f"{self._path}: missing tensor record {record}") from None
      dtype = np.dtype(_STORAGE_DTYPES[tag]).newbyteorder(self._byteorder)
      if len(raw) < numel * dtype.itemsize:
        raise pickle.UnpicklingError(
            f"{self._path}: record {record} has {len(raw)} bytes, expected {numel} x {dtype}")
      self._storages[key] = np.frombuffer(raw, dtype=dtype, count=numel)
    return self._storages[key]

  def _rebuild_tensor(self, storage, offset, size, stride, *unused_grad_hooks_metadata):
    size, stride = tuple(size), tuple(stride)
    # Bounds-check the view: the file sets it, and as_strided would read past the buffer.
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if (len(size) != len(stride) or offset < 0 or any(v < 0 for v in size + stride) or
        (0 not in size and last >= storage.size)):
      raise pickle.UnpicklingError(
          f"{self._path}: tensor view (offset={offset}, size={size}, stride={stride}) exceeds its "
          f"storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride))
    return np.array(view, dtype=storage.dtype.newbyteorder("="))


def load_torchscript(path):
  """Returns the pickled object tree of a TorchScript/`torch.save` zip at `path`.

  Modules become nested dicts of their attributes; tensors become numpy arrays.
  """
  path = str(path)
  try:
    archive = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable TorchScript zip archive ({e})") from e
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one <prefix>/data.pkl record, found {pickles}")
    prefix = pickles[0].split("/")[0]
    with archive.open(pickles[0]) as f:
      return _to_tree(_Unpickler(f, archive, prefix, path).load())
