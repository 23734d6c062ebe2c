// What the page knows about the selected project: a REST snapshot, then every live event applied
// in seq order. Each event carries the new figures (wallet, budget) or the id it is about, so
// applying one twice, or one the snapshot already reflects, changes nothing.

import type { Envelope } from "./live";

export interface Feed {
  id: string;
  model: string;
  agent_id: string | null;
  key_id: string | null;
  status: string;
  outcome: string | null;
  reasons: { code: string; message: string }[];
  risk_score: number | null;
  risk_factors: { type: string; description: string; contribution: number; severity: string }[];
  estimated_cost_micros: number | null;
  cost_micros: number | null;
  created_at: string;
  settled_at: string | null;
  error: { code?: string; message?: string } | null;
}

export interface Board {
  projectId: string;
  role: string;
  wallet: { balance_micros: number; reserved_micros: number; available_micros: number;
            deposit_address: string | null } | null;
  budgets: Map<string, any>;
  requests: Map<string, Feed>;
  approvals: Map<string, any>;
  payments: Map<string, any>;
  deposits: Map<string, any>;
  insights: Map<string, any> | null; // null: this server has no insights
  agents: Map<string, any>;
  keys: Map<string, any>;
  policy: any;
  thresholds: Map<string, number>; // budget id -> last threshold (percent) reached this period
}

const FEED_LIMIT = 300;

export function emptyBoard(projectId: string, role: string): Board {
  return { projectId, role, wallet: null, budgets: new Map(), requests: new Map(), approvals: new Map(),
           payments: new Map(), deposits: new Map(), insights: null, agents: new Map(), keys: new Map(),
           policy: null, thresholds: new Map() };
}

export function fromRequest(row: any): Feed {
  const d = row.decision ?? {};
  return {
    id: row.id, model: row.model, agent_id: row.agent_id ?? null, key_id: row.key_id ?? null, status: row.status,
    outcome: d.outcome ?? null, reasons: d.reasons ?? [], risk_score: d.risk_score ?? row.risk_score ?? null,
    risk_factors: d.risk_factors ?? [], estimated_cost_micros: row.estimated_cost_micros ?? null,
    cost_micros: row.cost_micros ?? null, created_at: row.created_at, settled_at: row.settled_at ?? null,
    error: row.error ?? null,
  };
}

function request(board: Board, id: string, ts: string): Feed {
  let row = board.requests.get(id);
  if (!row) {
    row = { id, model: "", agent_id: null, key_id: null, status: "executing", outcome: null, reasons: [],
            risk_score: null, risk_factors: [], estimated_cost_micros: null, cost_micros: null, created_at: ts,
            settled_at: null, error: null };
    board.requests.set(id, row);
    if (board.requests.size > FEED_LIMIT) {
      const oldest = [...board.requests.values()].sort((a, b) => a.created_at.localeCompare(b.created_at))[0];
      board.requests.delete(oldest.id);
    }
  }
  return row;
}

/** Apply one live event; returns the panels it touched. */
export function apply(board: Board, event: Envelope): string[] {
  const d = event.data ?? {};
  switch (event.type) {
    case "wallet.updated":
      board.wallet = { ...(board.wallet ?? { deposit_address: null }), balance_micros: d.balance_micros,
                       reserved_micros: d.reserved_micros, available_micros: d.available_micros };
      return ["wallet"];
    case "budget.updated":
      if (d.budget?.active === false) board.budgets.delete(d.budget.id);
      else if (d.budget) board.budgets.set(d.budget.id, d.budget);
      return ["budgets"];
    case "budget.threshold":
      board.thresholds.set(d.budget_id, d.threshold);
      return ["budgets"];
    case "request.created": {
      const row = request(board, d.request_id, event.ts);
      Object.assign(row, { model: d.model, agent_id: d.agent_id ?? null, key_id: d.key_id ?? null });
      row.created_at = event.ts < row.created_at ? event.ts : row.created_at;
      return ["feed"];
    }
    case "request.decided": {
      const row = request(board, d.request_id, event.ts);
      Object.assign(row, { outcome: d.outcome, reasons: d.reasons ?? [], risk_score: d.risk_score ?? null,
                           risk_factors: d.risk_factors ?? [], estimated_cost_micros: d.estimated_cost_micros,
                           error: d.error ?? null });
      if (d.status && !["settled", "failed"].includes(row.status)) row.status = d.status;
      return ["feed"];
    }
    case "request.settled": {
      const row = request(board, d.request_id, event.ts);
      row.status = "settled";
      row.cost_micros = d.receipt?.cost_micros ?? row.cost_micros;
      row.settled_at = d.receipt?.settled_at ?? event.ts;
      if (d.receipt?.model) row.model = d.receipt.model;
      board.approvals.delete(d.request_id);
      return ["feed", "chart", "approvals", "wallet"];
    }
    case "request.failed": {
      const row = request(board, d.request_id, event.ts);
      row.status = "failed";
      row.error = d.error ?? null;
      row.cost_micros = d.cost_micros ?? 0;
      row.settled_at = event.ts;
      board.approvals.delete(d.request_id);
      return ["feed", "chart", "approvals"];
    }
    case "approval.requested": {
      board.approvals.set(d.request_id, { ...d, created_at: event.ts });
      const row = request(board, d.request_id, event.ts);
      if (row.status === "executing") row.status = "pending_approval";
      return ["approvals", "feed"];
    }
    case "approval.resolved": {
      board.approvals.delete(d.request_id);
      const row = board.requests.get(d.request_id);
      if (row && row.status === "pending_approval") {
        row.status = { approved: "approved", rejected: "rejected", expired: "expired" }[d.resolution as string]
          ?? row.status;
      }
      return ["approvals", "feed"];
    }
    case "agent.created":
      if (d.agent) board.agents.set(d.agent.id, d.agent);
      return ["feed", "admin"];
    case "key.created":
      if (d.key) board.keys.set(d.key.id, d.key);
      return ["admin"];
    case "key.revoked": {
      const key = board.keys.get(d.key_id);
      if (key) key.revoked_at = key.revoked_at ?? event.ts;
      return ["admin"];
    }
    case "policy.updated":
      return ["policy"];
    case "insight.created":
    case "insight.updated":
    case "insight.resolved": {
      if (!board.insights) board.insights = new Map();
      const insight = d.insight ?? d;
      if (!insight?.id) return [];
      if (event.type === "insight.resolved" || (insight.status && insight.status !== "open")) {
        board.insights.delete(insight.id);
      } else {
        board.insights.set(insight.id, insight);
      }
      return ["insights", "wallet", "budgets"];
    }
    case "payment.created":
    case "payment.submitted":
    case "payment.confirmed":
    case "payment.failed": {
      const known = board.payments.get(d.payment_id) ?? { created_at: event.ts };
      board.payments.set(d.payment_id, { ...known, ...d, id: d.payment_id });
      return ["payments"];
    }
    case "deposit.credited": {
      const known = board.deposits.get(d.deposit_id) ?? { created_at: event.ts };
      board.deposits.set(d.deposit_id, { ...known, ...d, id: d.deposit_id, status: "confirmed" });
      return ["payments"];
    }
    default:
      return [];
  }
}

/** Settled spend per hour over the last hour of the feed (micro-USDC), for the runway. */
export function burnPerHour(board: Board, now = Date.now()): number {
  let spent = 0;
  for (const row of board.requests.values()) {
    if (row.settled_at && now - Date.parse(row.settled_at) <= 3_600_000) spent += row.cost_micros ?? 0;
  }
  return spent;
}

export function insightFor(board: Board, kind: string, match: (subject: any) => boolean = () => true): any {
  if (!board.insights) return null;
  for (const insight of board.insights.values()) {
    if (insight.kind === kind && match(insight.subject ?? {})) return insight;
  }
  return null;
}
