"""Typed FastAPI dependencies.

Dependencies are `async def`: FastAPI runs a plain `def` dependency in its worker-thread pool, so every
request would hop to a thread (up to 40 of them, each with its own C-heap arena) for an attribute read.
"""

from typing import Annotated

from fastapi import Depends, Request

from service.engine.client import EngineClient


async def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


EngineDep = Annotated[EngineClient, Depends(get_engine)]
