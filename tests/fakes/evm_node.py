"""A JSON-RPC node on a real loopback socket, backed by the in-process EVM (eth-tester + py-evm) with the real
USDC token deployed: what ``SMARTSPACE_CHAIN=rpc`` talks to in tests, through web3.py's AsyncHTTPProvider.

``arc=True`` makes it answer like Arc: every receipt that carries a Transfer log from the token carries a
second, identical Transfer log emitted by a system address (as Arc's native-USDC bookkeeping does).
Node errors (a re-sent transaction, a nonce gap) come back as JSON-RPC errors, as a real node sends them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from server.chain.devnet import Devnet
from server.chain.receipts import TRANSFER_TOPIC, to_hex

ARC_SYSTEM_ADDRESS = "0x0000000000000000000000000000000000000800"


def wire(value: Any) -> Any:
    """eth-tester's Python values → JSON-RPC wire format (quantities and bytes as 0x-hex)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {k: wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [wire(v) for v in value]
    return value


class FakeEvmNode:
    def __init__(self, devnet: Devnet, *, arc: bool = False) -> None:
        self.devnet = devnet
        self.arc = arc
        self.calls: list[str] = []
        self._runner: web.AppRunner | None = None
        self._request = None
        self.url = ""

    @classmethod
    async def start(cls, *, treasury_key: str, arc: bool = False, port: int = 0, serve: bool = True) -> FakeEvmNode:
        node = cls(await Devnet.start(treasury_key=treasury_key), arc=arc)
        backend = node.devnet.w3
        node._request = await backend.provider.request_func(backend, backend.middleware_onion)
        node.url = f"http://127.0.0.1:{port}"
        if serve:
            await node.serve(port)
        return node

    async def serve(self, port: int = 0) -> None:
        """Start answering on loopback (``port`` 0: any free port)."""
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        method, params = body["method"], body.get("params") or []
        self.calls.append(method)
        out: dict[str, Any] = {"jsonrpc": "2.0", "id": body.get("id")}
        try:
            response = await self._request(method, params)  # type: ignore[misc]
        except Exception as exc:  # eth-tester raises; a node answers with an error object
            out["error"] = {"code": -32000, "message": str(exc)}
            return web.json_response(out)
        if "error" in response:
            out["error"] = wire(response["error"])
        else:
            result = wire(response.get("result"))
            if self.arc and method == "eth_getTransactionReceipt" and result:
                result = self._arc_receipt(result)
            out["result"] = result
        return web.json_response(out)

    def _arc_receipt(self, receipt: dict[str, Any]) -> dict[str, Any]:
        token = self.devnet.chain.token_address
        logs = list(receipt.get("logs") or [])
        extra = [{**log, "address": ARC_SYSTEM_ADDRESS, "logIndex": hex(len(logs) + i)}
                 for i, log in enumerate(logs)
                 if log["address"].lower() == token and to_hex(log["topics"][0]) == TRANSFER_TOPIC]
        return {**receipt, "logs": logs + extra}

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.devnet.close()
