"""Baseline (a): a bare FastAPI app that validates the same model and answers 202, with no I/O."""

from fastapi import FastAPI

from shared.messages import NewOrder

app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})  # as the producer


@app.post("/orders", status_code=202)
async def submit(order: NewOrder) -> dict[str, str]:
    return {"status": "accepted", "customer_id": order.customer_id}
