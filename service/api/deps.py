"""Typed FastAPI dependencies."""

from typing import Annotated

from fastapi import Depends, Request

from service.engine.client import EngineClient


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


def get_request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "")


EngineDep = Annotated[EngineClient, Depends(get_engine)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
