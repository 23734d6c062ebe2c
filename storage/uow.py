"""The store: one transaction's repositories, created on first use."""

from __future__ import annotations

from functools import cached_property

from sqlalchemy.ext.asyncio import AsyncConnection

from storage import budgets, catalog, events, identity, insights, policies, spend, wallet
from storage.chat import ChatStore
from storage.payments import PaymentStore


class SqlStore:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    @cached_property
    def users(self) -> identity.Users:
        return identity.Users(self.conn)

    @cached_property
    def projects(self) -> identity.Projects:
        return identity.Projects(self.conn)

    @cached_property
    def members(self) -> identity.Members:
        return identity.Members(self.conn)

    @cached_property
    def agents(self) -> identity.Agents:
        return identity.Agents(self.conn)

    @cached_property
    def keys(self) -> identity.Keys:
        return identity.Keys(self.conn)

    @cached_property
    def events(self) -> events.EventLog:
        return events.EventLog(self.conn)

    @cached_property
    def catalog(self) -> catalog.CatalogModels:
        return catalog.CatalogModels(self.conn)

    @cached_property
    def policies(self) -> policies.Policies:
        return policies.Policies(self.conn)

    @cached_property
    def wallets(self) -> wallet.Wallets:
        return wallet.Wallets(self.conn)

    @cached_property
    def budgets(self) -> budgets.Budgets:
        return budgets.Budgets(self.conn)

    @cached_property
    def payments(self) -> PaymentStore:
        return PaymentStore(self.conn)

    @cached_property
    def spend_requests(self) -> spend.SpendRequests:
        return spend.SpendRequests(self.conn)

    @cached_property
    def insights(self) -> insights.InsightRows:
        return insights.InsightRows(self.conn)

    @cached_property
    def chat(self) -> ChatStore:
        return ChatStore(self.conn)
