"""A study's predictions as DICOM a viewer shows: a TID 1500 Structured Report, a Grayscale Softcopy Presentation
State and a Secondary Capture per image, in a new series of the source study (highdicom builds every object).

Coordinates are the predictor's boxes as they are: DICOM's column\\row in the stored pixel frame, the top-left
corner of the top-left pixel at 0\\0 (the gate never turns a DICOM picture; MONOCHROME1 only changes its grey).
Every UID is derived from the sources and the model, so a result set rebuilt after a crash is the same objects.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fracture.boxes import heatmap
from fracture.boxes.detection import peak_label
from fracture.deploy.pacs.source import header_of, out_of_scope, set_key, set_uids, uid
from fracture.deploy.predictor import Prediction, Predictor
from fracture.imaging import preprocess
from fracture.scoring import metrics

log = logging.getLogger("fracture.dicom")
NOTICE = "Research tool, not for diagnosis"
SERIES_DESCRIPTION = "fracture AI results - research use, not for diagnosis"
SCHEME = "99FRACTURE"  # private codes live only under a 99-prefixed coding scheme (PS3.16 8.2)
LAYER_COLOURS = {"screening": (97.0, -22.0, 94.0), "balanced": (54.0, 80.0, 67.0), "default": (54.0, 80.0, 67.0)}  # CIELab: yellow, red
SC_COLOURS = {"screening": (0, 230, 255), "balanced": (40, 40, 255), "default": (40, 40, 255)}  # BGR for the burnt-in copy
SC_MAX_SIDE = 2048  # a Secondary Capture is for looking at: larger pictures are scaled down (its boxes with them)


def code(value: str, meaning: str, scheme: str = SCHEME):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, scheme, meaning)


def fracture_finding():
    """The finding every answer reports, SNOMED CT's "Fracture of bone": one spelling for the SR's groups."""
    return code("125605004", "Fracture of bone", "SCT")


@dataclass
class ImageResult:
    """One source instance: its header (no pixels), the predictor's answer, and where its pixels are."""

    header: object
    prediction: Prediction
    source: str | None = None  # the file, for a Secondary Capture: decoded again (through the gate) only while it is drawn


def operating_points(predictor: Predictor) -> list[tuple[str, float]]:
    """The model's screening and balanced thresholds (the two GSPS layers); its default when it stores neither."""
    named = [(n, predictor.thresholds[n]) for n in ("screening", "balanced") if n in predictor.thresholds]
    return named or [("default", predictor.thresholds.get("default", 0.5))]


def study_answer(predictor: Predictor, results: Sequence[ImageResult]) -> tuple[float, str] | None:
    """The study's probability by the model's own aggregation (chosen on validation), and its name."""
    probs = np.array([r.prediction.probability for r in results if not r.prediction.error], float)
    if not len(probs):
        return None
    method = predictor.meta.study_method
    _, aggregated, _ = metrics.aggregate_studies(probs, np.zeros(len(probs), int), method)
    return float(aggregated[0]), method


class ResultWriter:
    """Builds the DICOM answer for a study from the predictor's results."""

    def __init__(self, predictor: Predictor, secondary_capture: bool = True) -> None:
        self.predictor, self.secondary_capture = predictor, secondary_capture
        self.release = str(predictor.metadata.get("release", {}).get("name") or "fracture-model")
        self.points = operating_points(predictor)

    # --- the pieces every object shares -------------------------------------------------------------------------
    def _common(self) -> dict:
        from fracture import __version__

        return {"manufacturer": "fracture", "manufacturer_model_name": self.release[:64], "software_versions": f"fracture {__version__}",
                "device_serial_number": self.predictor.sha256[:16]}

    @staticmethod
    def _finish(ds: object, header: object, image_series: bool = True) -> object:
        """UTF-8 text (a non-ASCII name survives whatever set the source used), the series' notice, and in an
        image series the General Series module's laterality (type 2C: the source's, else present and empty)."""
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: any name the source held, in whichever set it was
        ds.SeriesDescription = SERIES_DESCRIPTION
        if image_series and "Laterality" not in ds:
            side = str(header.get("Laterality", "") or header.get("ImageLaterality", "") or "")
            ds.Laterality = side if side in ("L", "R") else ""
        return ds

    def _algorithm(self):
        from highdicom.sr import AlgorithmIdentification

        return AlgorithmIdentification(name=self.release[:64], version=self.predictor.sha256)

    # --- the Structured Report -----------------------------------------------------------------------------------
    def _decisions(self, probability: float) -> list:
        from highdicom.sr import QualitativeEvaluation

        present, absent = code("52101004", "Present", "SCT"), code("2667000", "Absent", "SCT")
        return [QualitativeEvaluation(code(f"OP-{name.upper()}", f"Fracture at the {name} operating point (threshold {t:.4f})"),
                                      present if probability > t else absent) for name, t in self.points]

    def _image_group(self, r: ImageResult, index: int) -> list:
        from highdicom.sr import (GraphicTypeValues, ImageRegion, Measurement, MeasurementsAndQualitativeEvaluations,
                                  PlanarROIMeasurementsAndQualitativeEvaluations, QualitativeEvaluation, SourceImageForMeasurementGroup,
                                  SourceImageForRegion, TrackingIdentifier)

        finding, one = fracture_finding(), code("1", "no units", "UCUM")
        p, header = r.prediction, r.header
        extra = [QualitativeEvaluation(code("SCOPE", "Outside the model's scope"), code("OUT", reason)) for reason in out_of_scope(header)]
        if p.error:
            extra.append(QualitativeEvaluation(code("NOT-READ", "Image not read"), code("GATE", p.error.rsplit(": ", 1)[-1][:64])))
            measurements, decisions = None, []
        else:
            measurements = [Measurement(code("PROB", "Fracture probability"), p.probability, one, algorithm_id=self._algorithm())]
            decisions = self._decisions(p.probability)
        groups = [MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=uid("image-group", header.SOPInstanceUID, self.predictor.sha256), identifier=f"image {index}"),
            finding_type=finding, algorithm_id=self._algorithm(), measurements=measurements, qualitative_evaluations=decisions + extra or None,
            source_images=[SourceImageForMeasurementGroup.from_source_image(header)])]
        for k, (x0, y0, x1, y1, score) in enumerate(p.boxes or []):
            polyline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)
            region = ImageRegion(GraphicTypeValues.POLYLINE, polyline, SourceImageForRegion.from_source_image(header))
            groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=uid("box", header.SOPInstanceUID, k, self.predictor.sha256), identifier=f"image {index} box {k}"),
                referenced_region=region, finding_type=finding, algorithm_id=self._algorithm(),
                measurements=[Measurement(code("BOX-SCORE", "Fracture map peak in the region"), score, one)]))
        return groups

    def _study_group(self, results: Sequence[ImageResult]) -> list:
        from highdicom.sr import Measurement, MeasurementsAndQualitativeEvaluations, QualitativeEvaluation, TrackingIdentifier

        notice = QualitativeEvaluation(code("NOTICE", "Intended use"), code("RESEARCH", NOTICE))
        answer = study_answer(self.predictor, results)
        measurements, decisions = None, []
        if answer is not None:
            measurements = [Measurement(code("STUDY-PROB", f"Study fracture probability ({answer[1]} over its images)"), answer[0],
                                        code("1", "no units", "UCUM"), algorithm_id=self._algorithm())]
            decisions = self._decisions(answer[0])
        return [MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=uid("study-group", results[0].header.StudyInstanceUID, self.predictor.sha256), identifier="study"),
            finding_type=fracture_finding(), algorithm_id=self._algorithm(), measurements=measurements,
            qualitative_evaluations=[notice, *decisions])]

    def report(self, results: Sequence[ImageResult], series_uid: str, key: str, predecessors: Sequence[object] = ()) -> object:
        """The study's TID 1500 measurement report: per image its probability, decisions and boxes; the study's answer."""
        from highdicom.sr import Comprehensive3DSR, DeviceObserverIdentifyingAttributes, MeasurementReport, ObservationContext, ObserverContext

        observer = ObserverContext(observer_type=code("121007", "Device", "DCM"),
                                   observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                                       uid=uid("device", self.predictor.sha256), name=self.release[:64], manufacturer_name="fracture",
                                       model_name=self.release[:64]))
        groups = [g for i, r in enumerate(results) for g in self._image_group(r, i + 1)] + self._study_group(results)
        content = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                                    procedure_reported=code("363680008", "Radiographic imaging procedure", "SCT"),
                                    imaging_measurements=groups, title=code("126000", "Imaging Measurement Report", "DCM"))
        sr = Comprehensive3DSR(evidence=[r.header for r in results], content=content, series_instance_uid=series_uid, series_number=9901,
                               sop_instance_uid=set_uids(key)[1], instance_number=1, manufacturer="fracture", is_complete=True,
                               previous_versions=list(predecessors) or None, institution_name=None)
        return self._finish(sr, results[0].header, image_series=False)

    # --- per image: the presentation state and the Secondary Capture -------------------------------------------
    def presentation_state(self, r: ImageResult, series_uid: str, number: int) -> object:
        """Boxes over the original in two layers, one per operating point, each with a text label of the probability."""
        from highdicom import PresentationLUTShapeValues, PresentationLUTTransformation
        from highdicom.color import CIELabColor
        from highdicom.pr import GraphicAnnotation, GraphicLayer, GraphicObject, GrayscaleSoftcopyPresentationState, TextObject

        header, p = r.header, r.prediction
        annotations, layers = [], []
        for order, (name, t) in enumerate(self.points, 1):
            layer = GraphicLayer(name.upper(), order, f"{name} operating point, threshold {t:.4f}", CIELabColor(*LAYER_COLOURS[name]))
            layers.append(layer)
            positive = p.probability > t  # called only for images that were read
            label = f"{name}: {'fracture' if positive else 'no fracture'} p={p.probability:.2f}"
            line = max(20.0, float(header.Rows) / 30)  # a text box in proportion to the image: viewers fit text to it
            texts = [TextObject(f"{label} - {NOTICE}"[:64], "PIXEL", bounding_box=(0.0, line * (order - 1), float(header.Columns), line * order))]
            graphics = []
            for k, (x0, y0, x1, y1, score) in enumerate(p.boxes or [] if positive else []):
                polyline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)
                graphics.append(GraphicObject("POLYLINE", polyline, "PIXEL", tracking_id=f"{name} box {k}",
                                              tracking_uid=uid("gsps-box", header.SOPInstanceUID, name, k, series_uid)))
                texts.append(TextObject(peak_label(score), "PIXEL", anchor_point=(float(x0), float(max(y0 - 4, 0))), anchor_point_visible=False))
            annotations.append(GraphicAnnotation([header], layer, graphic_objects=graphics or None, text_objects=texts))
        inverse = str(header.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
        lut = PresentationLUTTransformation(presentation_lut_shape=PresentationLUTShapeValues.INVERSE if inverse else PresentationLUTShapeValues.IDENTITY)
        gsps = GrayscaleSoftcopyPresentationState(
            referenced_images=[header], series_instance_uid=series_uid, series_number=9901,
            sop_instance_uid=uid("gsps", header.SOPInstanceUID, series_uid), instance_number=number,
            content_label="FRACTURE", content_description=f"{self.release}: {NOTICE}"[:64], graphic_annotations=annotations,
            graphic_layers=layers, presentation_lut_transformation=lut, **self._common())
        return self._finish(gsps, header)

    def capture(self, r: ImageResult, picture: np.ndarray, series_uid: str, number: int) -> object:
        """The picture as the model saw it, with the boxes (dashed: screening, solid: balanced) and the notice burnt in."""
        from highdicom.sc import SCImage

        picture = burn_in(picture, r.prediction, self.points)
        given = [str(v) for v in (r.header.get("PatientOrientation") or [])]
        known = len(given) == 2 and all(re.fullmatch(r"[APLRHF]", v) for v in given)  # what highdicom's enum takes
        sc = SCImage.from_ref_dataset(r.header, picture, "RGB", 8, coordinate_system="PATIENT", patient_orientation=tuple(given) if known else ("L", "F"),
                                      series_instance_uid=series_uid, series_number=9901,
                                      sop_instance_uid=uid("sc", r.header.SOPInstanceUID, series_uid),
                                      instance_number=number, manufacturer="fracture", transfer_syntax_uid="1.2.840.10008.1.2.1")
        if not known:  # type 2C: the source's when valid (e.g. "AL\\F", which highdicom's enum lacks), else present and empty
            valid = len(given) == 2 and all(re.fullmatch(r"[APLRHF]{1,3}", v) and not any(set(pair) <= set(v) for pair in ("AP", "LR", "HF"))
                                            for v in given)
            sc.PatientOrientation = given if valid else None
        sc.BurnedInAnnotation, sc.ConversionType = "YES", "WSD"
        sc.ImageComments = NOTICE
        return self._finish(sc, r.header)

    def result_set(self, reported: Sequence[ImageResult], new: Sequence[ImageResult], predecessors: Sequence[object] = (),
                   max_bytes: int | None = None) -> Iterator[tuple[str, object]]:
        """The answer for a study whose images are ``reported`` (in earlier answers) + ``new``, as (kind, dataset),
        in a series of the set's own: a GSPS for every image (from its header), an SC for each new one (its pixels,
        decoded again through the gate: those of earlier images left the spool once delivered, and their SCs, in
        the earlier series, show the same answer), then one SR over all of them. One picture is decoded at a time,
        so a study of many large images holds one. UIDs come from the source UIDs and the model."""
        every = [*reported, *new]
        key = set_key(self.predictor.sha256, [r.header.SOPInstanceUID for r in every])
        series = set_uids(key)[0]
        fresh = {id(r) for r in new}
        for i, r in enumerate(every):
            if r.prediction.error:  # nothing to draw on: the SR lists it as not read, with the reason
                continue
            if grey(r.header):  # a colour source (a screenshot as Secondary Capture) gets its boxes in the SR and SC only
                gsps = _or_none(lambda: self.presentation_state(r, series, 2 + 2 * i), "presentation state", i)
                if gsps is not None:
                    yield "gsps", gsps
            if self.secondary_capture and r.source is not None and id(r) in fresh:
                sc = _or_none(lambda: self.capture(r, preprocess.read_image(r.source, **({"max_bytes": max_bytes} if max_bytes else {})),
                                                   series, 3 + 2 * i), "secondary capture", i)
                if sc is not None:
                    yield "sc", sc
        yield "sr", self.report(every, series, key, predecessors)


def _or_none(build: Callable[[], object], what: str, index: int) -> object | None:
    """One image's presentation state or capture, or None with a log line: a header one library will not copy
    must not cost the rest of the study its answer (the SR still holds that image's probability and boxes). The
    line names the exception's type only: its text may quote patient data."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - highdicom and pydicom raise many types for headers they refuse
        log.warning("image %d of the study: no %s (%s); its answer is in the SR", index + 1, what, type(exc).__name__)
        return None


def grey(header: object) -> bool:
    """A source a grayscale presentation state can refer to: one sample per pixel, not a palette. (A colour state
    needs the source's ICC profile, which a screenshot rarely carries, as an input device's: not invented here.)"""
    return int(header.get("SamplesPerPixel", 1) or 1) == 1 and str(header.get("PhotometricInterpretation", "")).upper() != "PALETTE COLOR"


def write_files(writer: ResultWriter, rows: Sequence[Prediction], out_dir: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """``predict --dicom-out``: each study's result set from files as ``SR-``, ``PR-`` and ``SC-<SOP Instance UID>.dcm``.

    Returns (files written, refusals): an input that is not DICOM gets no DICOM answer, and says so."""
    from fracture.imaging import dicom

    out, written, refused = Path(out_dir), [], []
    studies: dict[str, list[ImageResult]] = {}
    for r in rows:
        if not (r.path.lower().endswith(".dcm") or preprocess.has_dicom_preamble(r.path)):
            refused.append(f"{r.path}: not DICOM; --dicom-out answers DICOM inputs only (their UIDs and patient are what it refers to)")
            continue
        try:
            header = header_of(dicom.read_header(preprocess.read_bytes(r.path, writer.predictor.max_bytes), r.path))
            studies.setdefault(str(header.StudyInstanceUID), []).append(ImageResult(header, r, r.path))
        except (preprocess.ImageError, ValueError) as exc:
            refused.append(f"{r.path}: no DICOM answer ({exc})")
    out.mkdir(parents=True, exist_ok=True)
    for study, results in studies.items():
        try:
            objects = list(writer.result_set([], results, max_bytes=writer.predictor.max_bytes))
        except Exception as exc:  # noqa: BLE001 - one study's odd header must not cost the others their answers
            refused.append(f"study of {', '.join(str(r.source) for r in results)}: no DICOM answer ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        for kind, ds in objects:
            path = out / f"{ {'sr': 'SR', 'gsps': 'PR', 'sc': 'SC'}[kind]}-{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
    return written, refused


def burn_in(picture: np.ndarray, p: Prediction, points: Sequence[tuple[str, float]]) -> np.ndarray:
    """A grey picture → RGB with each operating point's boxes and the notice drawn in (scaled to SC_MAX_SIDE)."""
    scale = min(1.0, SC_MAX_SIDE / max(picture.shape))
    grey = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else picture
    out = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    size = max(out.shape[:2]) / 900
    thick = max(1, int(round(2 * size)))
    for name, t in points:
        if p.probability is None or p.probability <= t:
            continue
        for x0, y0, x1, y1, _ in p.boxes or []:
            a, b = (int(round(x0 * scale)), int(round(y0 * scale))), (int(round(x1 * scale)) - 1, int(round(y1 * scale)) - 1)
            if name == "screening":  # just outside the balanced box, so both show when both call it
                pad = 3 * thick
                heatmap.dashed_rectangle(out, (a[0] - pad, a[1] - pad), (b[0] + pad, b[1] + pad), SC_COLOURS[name], thick)
            else:
                cv2.rectangle(out, a, b, SC_COLOURS[name], thick)
    lines = [NOTICE.upper()]
    if p.probability is not None:
        lines.append(f"fracture probability {p.probability:.2f}  " + "  ".join(f"{n}: {'YES' if p.probability > t else 'no'}" for n, t in points))
        if len(points) > 1:
            lines.append("boxes: dashed yellow = screening point, solid red = balanced point")
    size = min(size, out.shape[1] / 440)  # the longest line fits a narrow picture
    font, scale_f = cv2.FONT_HERSHEY_SIMPLEX, 0.7 * size
    step, margin = int(28 * size) + 2, int(8 * size) + 4
    width = max(cv2.getTextSize(t, font, scale_f, thick)[0][0] for t in lines)
    cv2.rectangle(out, (0, 0), (min(out.shape[1] - 1, width + 2 * margin), step * len(lines) + margin), (0, 0, 0), -1)  # a band: legible on bone
    for i, text in enumerate(lines):
        cv2.putText(out, text, (margin, step * (i + 1)), font, scale_f, (255, 255, 255), thick, cv2.LINE_AA)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
