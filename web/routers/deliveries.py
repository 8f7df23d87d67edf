"""``/api/deliveries``: the outbox of objects the node wrote, newest first; a failed one can be sent again."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import func, select

from dicom_node.delivery import DeliveryQueue
from dicom_node.models import Delivery, DeliveryState, Instance
from web.dependencies import ContextDep, IndexText, Limit, Offset, RowId, SessionDep
from web.schemas import DeliveryListItem, DeliveryOut, Page, Problem

log = logging.getLogger(__name__)

router = APIRouter(prefix="/deliveries", tags=["deliveries"])


@router.get("", response_model=Page[DeliveryListItem])
def list_deliveries(
    session: SessionDep,
    state: DeliveryState | None = None,
    destination: Annotated[
        IndexText | None, Query(max_length=64, description="A configured destination's name.")
    ] = None,
    offset: Offset = 0,
    limit: Limit = 50,
) -> Page[DeliveryListItem]:
    """Deliveries, the most recently queued first."""
    conditions = []
    if state is not None:
        conditions.append(Delivery.state == state)
    if destination is not None:
        conditions.append(Delivery.destination == destination)
    total = session.scalar(select(func.count()).select_from(Delivery).where(*conditions)) or 0
    rows = session.execute(
        select(Delivery, Instance.sop_instance_uid, Instance.sop_class_uid)
        .join(Instance, Delivery.instance_pk == Instance.id)
        .where(*conditions)
        .order_by(Delivery.id.desc())
        .offset(offset)
        .limit(limit)
    ).all()
    items = [
        DeliveryListItem(
            **DeliveryOut.model_validate(delivery).model_dump(), sop_instance_uid=sop_uid, sop_class_uid=sop_class
        )
        for delivery, sop_uid, sop_class in rows
    ]
    return Page(items=items, total=total, offset=offset, limit=limit)


@router.post(
    "/{delivery_id}/retry",
    response_model=DeliveryOut,
    responses={404: {"model": Problem}, 409: {"model": Problem}},
)
def retry_delivery(delivery_id: RowId, context: ContextDep, session: SessionDep) -> DeliveryOut:
    """Queue a failed delivery again with fresh attempts (as ``dicom-node resend --id``); the node's sender
    sends it at its next poll. 409 for a delivery that has not failed."""
    state = session.scalar(select(Delivery.state).where(Delivery.id == delivery_id))
    if state is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no delivery {delivery_id}")
    if state != DeliveryState.FAILED:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"delivery {delivery_id} is {state}: only a failed delivery can be retried"
        )
    settings = context.settings.delivery
    queue = DeliveryQueue(context.sessions, settings.max_attempts, settings.retry_backoff, settings.max_backoff)
    if not queue.resend([delivery_id]):  # another request or `dicom-node resend` was first
        raise HTTPException(status.HTTP_409_CONFLICT, f"delivery {delivery_id} is no longer failed")
    log.info("delivery %d queued again through the API", delivery_id)
    session.rollback()  # end the request's read transaction: read the row as resend left it
    return DeliveryOut.model_validate(session.get_one(Delivery, delivery_id))
