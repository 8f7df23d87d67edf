"""Index rows to API models: the Patient > Study > Series > Instance tree and what hangs off an instance.

Each tree is loaded with a fixed number of queries (eager ``selectin`` loads), however many instances it has.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from dicom_node.models import InferenceResult, Instance, Patient, Series, Study
from web.schemas import InstanceSummary, ResultOut, SeriesOut, StudyOut

_ORDER_LAST = 2**31


def patient_with_tree(session: Session, patient_id: str) -> Patient | None:
    """The patient with their studies, series, instances and the instances' jobs."""
    studies = selectinload(Patient.studies)
    tree = studies.selectinload(Study.series).selectinload(Series.instances).selectinload(Instance.jobs)
    return session.scalar(select(Patient).where(Patient.patient_id == patient_id).options(tree))


def study_with_tree(session: Session, study_uid: str) -> Study | None:
    """The study with its patient, series, instances and the instances' jobs."""
    tree = selectinload(Study.series).selectinload(Series.instances).selectinload(Instance.jobs)
    return session.scalar(
        select(Study).where(Study.study_instance_uid == study_uid).options(tree, selectinload(Study.patient))
    )


def source_uids(session: Session, instances: Iterable[Instance]) -> dict[int, str]:
    """The SOP Instance UIDs of the received instances that ``instances`` the node wrote report on, by key."""
    keys = {instance.source_instance_pk for instance in instances if instance.source_instance_pk is not None}
    if not keys:
        return {}
    rows = session.execute(select(Instance.id, Instance.sop_instance_uid).where(Instance.id.in_(keys)))
    return {key: uid for key, uid in rows}


def studies_out(session: Session, studies: Iterable[Study]) -> list[StudyOut]:
    studies = sorted(studies, key=lambda study: (study.study_date is None, study.study_date, study.id))
    sources = source_uids(session, (i for study in studies for series in study.series for i in series.instances))
    return [study_out(study, sources) for study in studies]


def study_out(study: Study, sources: dict[int, str]) -> StudyOut:
    return StudyOut(
        study_instance_uid=study.study_instance_uid,
        study_date=study.study_date,
        accession_number=study.accession_number,
        description=study.description,
        series=[series_out(series, sources) for series in sorted(study.series, key=lambda series: series.id)],
    )


def series_out(series: Series, sources: dict[int, str]) -> SeriesOut:
    instances = sorted(
        series.instances,
        key=lambda instance: (
            instance.instance_number if instance.instance_number is not None else _ORDER_LAST,
            instance.id,
        ),
    )
    return SeriesOut(
        series_instance_uid=series.series_instance_uid,
        modality=series.modality,
        body_part_examined=series.body_part_examined,
        description=series.description,
        instances=[instance_summary(instance, sources) for instance in instances],
    )


def instance_summary(instance: Instance, sources: dict[int, str]) -> InstanceSummary:
    return InstanceSummary(**instance_fields(instance, sources))


def instance_fields(instance: Instance, sources: dict[int, str]) -> dict:
    """The fields of :class:`web.schemas.InstanceSummary`; ``instance.series`` and ``.jobs`` are read."""
    has_image = instance.rows is not None and instance.columns is not None
    return {
        "sop_instance_uid": instance.sop_instance_uid,
        "sop_class_uid": instance.sop_class_uid,
        "instance_number": instance.instance_number,
        "modality": instance.series.modality,
        "body_part_examined": instance.series.body_part_examined,
        "rows": instance.rows,
        "columns": instance.columns,
        "received_at": instance.received_at,
        "node_written": instance.source_instance_pk is not None,
        "source_sop_instance_uid": sources.get(instance.source_instance_pk),
        "job_states": {job.kind: job.state for job in sorted(instance.jobs, key=lambda job: job.id)},
        "image_url": f"/api/instances/{instance.sop_instance_uid}/image.png" if has_image else None,
    }


def result_out(result: InferenceResult) -> ResultOut:
    return ResultOut(
        id=result.id,
        task=result.task,
        output=result.output,
        is_primary=result.is_primary,
        summary=result.summary,
        values=result.values,
        model_name=result.model_name,
        model_version=result.model_version,
        weights_digest=result.weights_digest,
        demo_model=result.demo_model,
        timings_ms=result.timings_ms,
        created_at=result.created_at,
        heatmap_url=f"/api/results/{result.id}/heatmap.png",
    )
