"""Stand-in for SimpleITK on the lent GPU machine, which has none (gpu_selftrain.sh).

The machine takes at most 64 MiB with the repository; SimpleITK (28 MB packed) and half of
COVID-19-CT-Seg (35 MB) do not both fit. For ``.npz`` slice inputs the library names
SimpleITK only in annotations and signatures, so this stub lets it import. Any call or
instantiation (a function called, an image made) raises at once instead of giving wrong
results; a bare attribute such as ``sitkLinear`` is a placeholder class.
"""
__version__ = "0+stub"


def _missing(name: str) -> type:
    def fail(*_args, **_kwargs):
        raise RuntimeError(f"SimpleITK.{name} was used, but this is simpleitk_stub.py's stand-in "
                           "(only .npz slice inputs work with it)")
    return type(name, (), {"__new__": fail})


def __getattr__(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
