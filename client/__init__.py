"""Typed Python client for the rank-elastic server: sync and async, streaming, typed errors."""

from client.api import AsyncClient, Client
from client.errors import ClientError, InvalidRequest, Overloaded, ServerError, Unauthorized

__all__ = ["AsyncClient", "Client", "ClientError", "InvalidRequest", "Overloaded", "ServerError", "Unauthorized"]
