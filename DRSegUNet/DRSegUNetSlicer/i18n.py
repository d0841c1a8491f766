"""Slicer's translation functions, with stand-ins where ``slicer.i18n`` is missing (slicer-core outside the application)."""

try:
    from slicer.i18n import tr as _  # noqa: F401  (used by the modules of this package)
    from slicer.i18n import translate  # noqa: F401
except ImportError:  # slicer-core outside the application has no i18n
    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text
