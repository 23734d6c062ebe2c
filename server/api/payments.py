"""Payments (API.md "Payments (USDC)"): deposits, withdrawals, payment status — and, on the devnet only,
routes that mint and send test USDC so a deposit can be demonstrated offline."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import Meta

from domain.base import Page
from domain.chain import ZERO_ADDRESS, normalize_address, normalize_tx_hash
from domain.errors import InvalidRequest, NotFound
from domain.payments import (
    Address,
    Deposit,
    DepositClaim,
    DepositInfo,
    DepositSender,
    Payment,
    SenderChallenge,
    SenderRegister,
    WithdrawalCreate,
)
from server.chain.devnet import Devnet
from server.chain.web3chain import Web3Chain
from server.chain.workers import CHAIN
from server.http import PAGE_QUERY, actor, decode, json_response, page_request, routes
from server.http import container as _c
from server.idempotency import HEADER as IDEMPOTENCY_KEY
from server.idempotency import Answered, idempotent, replayed

P = "/api/v1/projects/{project_id}"
ERR = (401, 403, 404, 422, 503)


async def _chain(request: web.Request) -> Web3Chain:
    return await request.app[CHAIN].get()


async def _with_confirmations(request: web.Request, items: list[Any]) -> None:
    """Confirmations are relative to the chain's head now, so they are computed when read."""
    mined = [i for i in items if i.block_number is not None and i.status != "failed"]
    if not mined:
        return
    head = await (await _chain(request)).head()
    for item in mined:
        item.confirmations = max(0, head - item.block_number + 1)


# ---------------------------------------------------------------- deposits
@routes.get(P + "/deposit-address", summary="Where to send USDC to fund this project", tag="payments",
            response=DepositInfo, errors=ERR, key_scope="payments:read")
async def deposit_address(request: web.Request) -> web.Response:
    await _chain(request)
    async with _c(request).uow(actor(request)) as uow:  # stores the derived address in the wallet once
        return json_response(await uow.payments.deposit_info(request.match_info["project_id"]))


@routes.get(P + "/deposit-senders/challenge", summary="The message a deposit sender's key signs (EIP-191 "
            "personal_sign) to prove it holds the address (admin)", tag="payments", response=SenderChallenge,
            query={"address": "the sender address to register (required)"}, errors=ERR)
async def sender_challenge(request: web.Request) -> web.Response:
    await _chain(request)
    async with _c(request).reader(actor(request)) as uow:
        return json_response(await uow.payments.sender_challenge(request.match_info["project_id"],
                                                                 request.query.get("address", "")))


@routes.post(P + "/deposit-senders", summary="Register a sender address for deposits to the shared treasury "
             "address, with its signature of the challenge message (admin)", tag="payments", body=SenderRegister,
             response=DepositSender, status=201, errors=(*ERR, 409))
async def register_sender(request: web.Request) -> web.Response:
    cmd = await decode(request, SenderRegister)
    await _chain(request)
    async with _c(request).uow(actor(request)) as uow:
        sender = await uow.payments.register_sender(request.match_info["project_id"], cmd)
    return json_response(sender, status=201)


@routes.post(P + "/deposits", summary="Claim a USDC transfer as a deposit: verified on chain, credited once when "
             "confirmed (201), or pending until then (202)", tag="payments", body=DepositClaim, response=Deposit,
             status=201, errors=(*ERR, 409))
async def claim_deposit(request: web.Request) -> web.Response:
    cmd = await decode(request, DepositClaim)
    project_id = request.match_info["project_id"]
    async with _c(request).reader(actor(request)) as uow:  # no chain I/O for callers who may not claim
        await uow.projects.require(project_id, "member")
    lookup = await (await _chain(request)).lookup(normalize_tx_hash(cmd.tx_hash))
    async with _c(request).uow(actor(request)) as uow:
        deposit = await uow.payments.claim_deposit(project_id, cmd.tx_hash, lookup)
    return json_response(deposit, status=201 if deposit.status == "confirmed" else 202)


@routes.get(P + "/deposits", summary="The project's deposits, newest first", tag="payments",
            response=Page[Deposit], query=PAGE_QUERY, errors=(401, 404), key_scope="payments:read")
async def list_deposits(request: web.Request) -> web.Response:
    page = page_request(request)
    async with _c(request).reader(actor(request)) as uow:
        result = await uow.payments.list_deposits(request.match_info["project_id"], page)
    await _with_confirmations(request, result.items)
    return json_response(result)


@routes.get("/api/v1/deposits/{deposit_id}", summary="A deposit", tag="payments", response=Deposit,
            errors=(401, 404), key_scope="payments:read")
async def get_deposit(request: web.Request) -> web.Response:
    async with _c(request).reader(actor(request)) as uow:
        deposit = await uow.payments.get_deposit(request.match_info["deposit_id"])
    await _with_confirmations(request, [deposit])
    return json_response(deposit)


# ---------------------------------------------------------------- withdrawals and payments
@routes.post(P + "/withdrawals", summary="Pay USDC out of the project's wallet from the treasury (admin; "
             "Idempotency-Key required)", tag="payments", body=WithdrawalCreate, response=Payment, status=201,
             errors=(*ERR, 402, 409))
async def withdraw(request: web.Request) -> web.StreamResponse:
    cmd = await decode(request, WithdrawalCreate)
    project_id = request.match_info["project_id"]
    key = request.headers.get(IDEMPOTENCY_KEY)

    async def run() -> web.Response:
        fees = await (await _chain(request)).fees()  # before the write transaction: no I/O inside it
        async with _c(request).uow(actor(request)) as uow:
            payment = await uow.payments.withdraw(project_id, cmd, key, fees)
        return json_response(payment, status=201)

    async def current() -> web.Response | None:  # the payout this key made, as it stands now
        async with _c(request).reader(actor(request)) as uow:
            payment = await uow.payments.payout_for_key(project_id, key or "")
        return None if payment is None else json_response(payment, status=201)

    async def replay(answer: Answered) -> web.Response:
        return await current() or replayed(answer)

    return await idempotent(request, actor(request), project_id, cmd, run, recover=lambda since: current(),
                            replay=replay)


@routes.get(P + "/payments", summary="The project's payouts, newest first", tag="payments",
            response=Page[Payment], query=PAGE_QUERY, errors=(401, 404), key_scope="payments:read")
async def list_payments(request: web.Request) -> web.Response:
    page = page_request(request)
    async with _c(request).reader(actor(request)) as uow:
        result = await uow.payments.list_payments(request.match_info["project_id"], page)
    await _with_confirmations(request, result.items)
    return json_response(result)


@routes.get("/api/v1/payments/{payment_id}", summary="A payment: status, tx_hash, block_number, confirmations",
            tag="payments", response=Payment, errors=(401, 404), key_scope="payments:read")
async def get_payment(request: web.Request) -> web.Response:
    async with _c(request).reader(actor(request)) as uow:
        payment = await uow.payments.get_payment(request.match_info["payment_id"])
    await _with_confirmations(request, [payment])
    return json_response(payment)


# ---------------------------------------------------------------- devnet only
DevMicros = Annotated[int, Meta(gt=0, le=1_000_000 * 1_000_000)]


class DevFund(msgspec.Struct, forbid_unknown_fields=True):
    address: Address
    amount_micros: DevMicros


class DevTransfer(msgspec.Struct, forbid_unknown_fields=True):
    to_address: Address
    amount_micros: DevMicros
    from_address: Address | None = None  # an address from /devnet/accounts; default: a fresh funded account


class DevTx(msgspec.Struct):
    tx_hash: str
    from_address: str | None = None
    to_address: str | None = None
    amount_micros: int = 0


def _recipient(raw: str, field: str) -> str:
    """The token refuses to mint or transfer to the zero address (the transaction would revert): say so."""
    address = normalize_address(raw, field)
    if address == ZERO_ADDRESS:
        raise InvalidRequest(f"{field} cannot be the zero address: the token refuses to send there", {field: raw})
    return address


async def _devnet(request: web.Request) -> Devnet:
    await _chain(request)
    devnet = request.app[CHAIN].devnet
    if devnet is None:
        raise NotFound("the devnet routes exist only with SMARTSPACE_CHAIN=devnet")
    actor(request)  # any signed-in user or key; the devnet's money is play money
    return devnet


@routes.post("/api/v1/devnet/fund", summary="Devnet only: mint test USDC to an address", tag="devnet",
             body=DevFund, response=DevTx, status=201, errors=(401, 404, 422))
async def devnet_fund(request: web.Request) -> web.Response:
    cmd = await decode(request, DevFund)
    to_address = _recipient(cmd.address, "address")
    devnet = await _devnet(request)
    tx_hash = await devnet.mint(to_address, cmd.amount_micros)
    return json_response(DevTx(tx_hash=tx_hash, to_address=to_address, amount_micros=cmd.amount_micros), status=201)


@routes.post("/api/v1/devnet/transfer", summary="Devnet only: a user's wallet sends test USDC (minted for it first) "
             "to an address, e.g. a project's deposit address; claim the returned tx_hash as a deposit",
             tag="devnet", body=DevTransfer, response=DevTx, status=201, errors=(401, 404, 422))
async def devnet_transfer(request: web.Request) -> web.Response:
    cmd = await decode(request, DevTransfer)
    to_address = _recipient(cmd.to_address, "to_address")
    payer = None if cmd.from_address is None else normalize_address(cmd.from_address, "from_address")
    devnet = await _devnet(request)
    if payer is None:
        payer = await devnet.fund_new_account()
    elif payer not in {normalize_address(a) for a in devnet.payers}:
        raise InvalidRequest("from_address must be a devnet test account (or leave it out)",
                             {"from_address": cmd.from_address})
    tx_hash = await devnet.pay(to_address, cmd.amount_micros, payer=payer)
    return json_response(DevTx(tx_hash=tx_hash, from_address=payer, to_address=to_address,
                               amount_micros=cmd.amount_micros), status=201)
