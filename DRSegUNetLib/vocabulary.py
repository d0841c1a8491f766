"""The one table of classes, label values, segment names, colours and terminology.

Used by the CLI, the report, the ``.seg.nrrd`` writer and the Slicer logic, so that
all of them say the same thing about the same label value.

Label values are exclusive: 0 background, 1 ground-glass opacity, 2 consolidation,
3 lung (lung tissue that is neither GGO nor consolidation). The *segment* "Lung" is
the whole lung field, i.e. the union of labels 1-3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

BACKGROUND, GGO, CONSOLIDATION, LUNG = 0, 1, 2, 3
# The names of the classes and of the region "infection" (GGO or consolidation), as reports, metrics,
# checkpoints, the CLI and the Slicer module spell them.
BACKGROUND_NAME, GGO_NAME, CONSOLIDATION_NAME, LUNG_NAME = "background", "ggo", "consolidation", "lung"
INFECTION_NAME = "infection"
CLASS_NAMES: tuple[str, ...] = (BACKGROUND_NAME, GGO_NAME, CONSOLIDATION_NAME, LUNG_NAME)  # by label value
NUM_CLASSES = len(CLASS_NAMES)
# The label values as help texts and messages list them: "0 background, 1 GGO, 2 consolidation, 3 lung".
LABEL_LEGEND = f"{BACKGROUND} background, {GGO} GGO, {CONSOLIDATION} consolidation, {LUNG} lung"


def check_class_names(names: Iterable[str], allowed: tuple[str, ...] = CLASS_NAMES) -> None:
    """ValueError naming every entry of ``names`` that is not one of ``allowed``."""
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise ValueError(f"unknown class names {unknown}; known ones are {', '.join(allowed)}")


# What a user can say they checked on an accepted slice (data.labels_to_allowed): the three
# segments, "background" (the same as "lung": everything outside the lung field is right),
# and "infection": the lesion extent is right, whether GGO or consolidation is left open.
CHECKABLE: tuple[str, ...] = CLASS_NAMES + (INFECTION_NAME,)

# Derived regions used by metrics and reports: name -> label values it is made of.
REGIONS: dict[str, tuple[int, ...]] = {
    GGO_NAME: (GGO,),
    CONSOLIDATION_NAME: (CONSOLIDATION,),
    INFECTION_NAME: (GGO, CONSOLIDATION),
    LUNG_NAME: (GGO, CONSOLIDATION, LUNG),  # the whole lung field, lesions included
}

# Slicer terminology: our own context (DRSegUNet/Resources/<TERMINOLOGY_FILE_NAME>, made by
# slicer_terminology_context() and loaded by the Slicer module at startup) lists exactly these
# three types with the names and colours below; the anatomic region is left empty.
TERMINOLOGY_CONTEXT = "Segmentation category and type - DRSegUNet"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
TERMINOLOGY_FILE_NAME = "SegmentationCategoryTypeModifier-DRSegUNet.term.json"
_TERMINOLOGY_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"

_CATEGORY_ANATOMY = ("SCT", "123037004", "Anatomical Structure")
_CATEGORY_ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")


@dataclass(frozen=True)
class Segment:
    """One output segment as Slicer shows it."""

    segment_id: str
    name: str
    labels: tuple[int, ...]  # label values whose union this segment covers
    color: tuple[float, float, float]  # RGB in [0, 1]
    category: tuple[str, str, str]  # (scheme, code, meaning)
    type: tuple[str, str, str]
    layer: int  # seg.nrrd layer; overlapping segments need different layers

    @property
    def terminology(self) -> str:
        """Slicer's terminology entry string (category and type; no modifiers)."""
        c, t = self.category, self.type
        return (
            f"{TERMINOLOGY_CONTEXT}"
            f"~{c[0]}^{c[1]}^{c[2]}~{t[0]}^{t[1]}^{t[2]}~^^"
            f"~{ANATOMIC_CONTEXT}~^^~^^"
        )

    @property
    def color_rgb255(self) -> list[int]:
        """The colour as a terminology file's ``recommendedDisplayRGBValue`` (0-255)."""
        return [int(round(255 * c)) for c in self.color]


SEGMENTS: tuple[Segment, ...] = (
    Segment(GGO_NAME, "Ground-glass opacity", (GGO,), (0.95, 0.85, 0.20),
            _CATEGORY_ALTERED, ("DCM", "112120", "Ground glass opacity"), 0),
    Segment(CONSOLIDATION_NAME, "Consolidation", (CONSOLIDATION,), (0.85, 0.25, 0.20),
            _CATEGORY_ALTERED, ("SCT", "95436008", "Lung consolidation"), 0),
    Segment(LUNG_NAME, "Lung", (GGO, CONSOLIDATION, LUNG), (0.50, 0.68, 0.85),
            _CATEGORY_ANATOMY, ("SCT", "39607008", "Lung"), 1),
)


def slicer_terminology_context() -> dict:
    """The Slicer terminology context (``.term.json``, dcmqi segment-context schema) of SEGMENTS.

    The Slicer module ships it as ``DRSegUNet/Resources/<TERMINOLOGY_FILE_NAME>``; a test checks
    that file against this function (``python -m DRSegUNetLib.vocabulary FILE`` writes it).
    """
    categories: list[dict] = []
    for s in SEGMENTS:
        scheme, code, meaning = s.category
        category = next((c for c in categories if (c["CodingSchemeDesignator"], c["CodeValue"]) == (scheme, code)), None)
        if category is None:
            category = {"CodeMeaning": meaning, "CodingSchemeDesignator": scheme, "CodeValue": code,
                        "showAnatomy": False, "Type": []}
            categories.append(category)
        category["Type"].append({
            "CodeMeaning": s.type[2], "CodingSchemeDesignator": s.type[0], "CodeValue": s.type[1],
            "3dSlicerLabel": s.name, "recommendedDisplayRGBValue": s.color_rgb255,
        })
    return {"SegmentationCategoryTypeContextName": TERMINOLOGY_CONTEXT, "@schema": _TERMINOLOGY_SCHEMA,
            "SegmentationCodes": {"Category": categories}}


def write_slicer_terminology_context(path) -> None:
    """Write :func:`slicer_terminology_context` as the module's ``.term.json`` (2-space JSON, newline at the end)."""
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps(slicer_terminology_context(), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import sys

    write_slicer_terminology_context(sys.argv[1] if len(sys.argv) > 1 else TERMINOLOGY_FILE_NAME)
