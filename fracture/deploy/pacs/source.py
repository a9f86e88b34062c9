"""What an answer takes from its source instance, and how its UIDs are made: the header as every answer copies
it (cleaned of values real archives hold but highdicom will not copy), the model's scope, name-based UIDs."""

from __future__ import annotations

import copy
import datetime as dt
import re
import uuid
from collections.abc import Sequence

import numpy as np

from fracture.imaging import dicom

OUT_OF_SCOPE_PARTS = {"CHEST", "SKULL", "HEAD", "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "COCCYX"}
UID_NAMESPACE = uuid.UUID("5d2f6c1e-8a41-5b7e-9c3d-f4a0e2b1c7d8")  # this project's name-based UUIDs (any fixed value works)


def uid(*parts: object) -> str:
    """A UID under 2.25 (PS3.5 B.2) from a name-based UUID of its parts: the same sources and model give the same
    UID after any restart. (pydicom's ``generate_uid`` ignores its entropy sources when there is no prefix.)"""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join(str(p) for p in parts)).int}"


TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
          "AccessionNumber")  # empty but present in every object that copies the patient and study modules
DATES = ("PatientBirthDate", "StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate", "InstanceCreationDate")
TIMES = ("StudyTime", "SeriesTime", "ContentTime", "AcquisitionTime", "InstanceCreationTime")


def header_of(ds: object) -> object:
    """A source's header without its pixels, as every answer copies it: the patient and study attributes present
    (empty when the modality left them out: many do, and highdicom, like the standard, needs them there); values
    real archives hold but highdicom refuses to copy emptied (a date "2023-01-01", a time "12:00", a sex "U");
    text decoded from the source's character set, to be written in UTF-8. Raises ValueError without the UIDs
    an answer must refer to."""
    from pydicom.config import RAISE
    from pydicom.dataset import Dataset
    from pydicom.multival import MultiValue
    from pydicom.valuerep import validate_value

    header = Dataset()
    for element in dicom.loaded_elements(ds):  # a value the header read left deferred (over 1 MB) is a blob, never copied
        bulk = element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") and len(element.value or b"") > 1024
        if (element.tag.group > 0x0002 and element.tag.group != 0x7FE0 and not 0x6000 <= element.tag.group <= 0x60FF and not bulk
                and element.keyword not in ("SpecificCharacterSet", "IconImageSequence")):  # no pixels, overlays, icons, blobs
            header.add(copy.copy(element))  # values below are replaced in the copy, never in the source's dataset
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID") if not str(header.get(k, "") or "")]
    if missing:
        raise ValueError(f"no {', '.join(missing)}: nothing an answer could refer to")
    invalid = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
               if len(str(header[k].value)) > 64 or not re.fullmatch(r"[0-9]+(\.[0-9]+)*", str(header[k].value))]
    if invalid:  # answers must quote it, and could not (a UI is at most 64 digits and dots; a leading zero, seen in old archives, passes)
        raise ValueError(f"{', '.join(invalid)} not a valid DICOM UID")
    header.SpecificCharacterSet = "ISO_IR 192"  # every name and text decoded above, whatever the source's set was
    for keyword in TYPE_2:
        if keyword not in header:
            setattr(header, keyword, "")
    for keyword, pattern in [*((k, r"\d{8}") for k in DATES), *((k, r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?") for k in TIMES)]:
        if keyword in header and not re.fullmatch(pattern, str(header[keyword].value or "").strip()):
            setattr(header, keyword, "")
    for element in header:  # an age, a number or a date-time no reader could parse (an age "abc", a height "NaN") is emptied
        if element.VR in ("AS", "DS", "IS", "DT") and element.value not in (None, ""):
            try:
                for value in element.value if isinstance(element.value, MultiValue) else [element.value]:
                    validate_value(element.VR, str(value), RAISE)  # the text as written (DSfloat keeps it)
            except ValueError:
                element.value = None
    if str(header.get("PatientSex", "") or "").upper() not in ("M", "F", "O"):
        header.PatientSex = ""
    if "VOILUTSequence" in header:  # a VOI LUT table as pydicom reads it (US: a list) → the OW bytes highdicom copies
        header.VOILUTSequence = copy.deepcopy(header.VOILUTSequence)
        for item in header.VOILUTSequence:
            data = item.get("LUTData")
            if data is not None and not isinstance(data, bytes):
                bits = int(item.LUTDescriptor[2])
                table = np.asarray([data] if isinstance(data, int) else list(data), np.uint8 if bits == 8 else np.uint16)
                item.add_new(0x00283006, "OW", table.tobytes())  # LUT Data, as bytes whatever VR it came in
    return header


def out_of_scope(header: object) -> list[str]:
    """Why an image lies outside what the model was trained on: body part chest, skull or spine; a patient under 18."""
    reasons = []
    part = str(header.get("BodyPartExamined", "") or "").upper().replace(" ", "")
    if part in OUT_OF_SCOPE_PARTS:
        reasons.append(f"body part {part}")
    age = str(header.get("PatientAge", "") or "")
    match = re.fullmatch(r"(\d{3})([DWMY])", age)
    if match:
        years = int(match[1]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[match[2]]
    else:
        try:
            born = dt.datetime.strptime(str(header.get("PatientBirthDate", "")), "%Y%m%d").date()
            seen = dt.datetime.strptime(str(header.get("StudyDate", "")), "%Y%m%d").date()
            years = (seen - born).days / 365.25
        except ValueError:
            years = None
    if years is not None and years < 18:
        reasons.append("patient under 18")
    return reasons


def set_key(model_sha256: str, sop_instance_uids: Sequence[str]) -> str:
    """A result set's identity: the model and the study's source instances, in any order."""
    return uid("set", model_sha256, *sorted(sop_instance_uids))


def set_uids(key: str) -> tuple[str, str]:
    """A result set's series and SR instance UIDs."""
    return uid("series", key), uid("sr", key)
