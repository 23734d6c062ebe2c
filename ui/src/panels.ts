// Rendering of the live panels. Each function rebuilds its panel's list from the board; texts from
// the API only ever go into Text nodes or attribute values (see dom.ts).

import { ago, duration, short, usdc } from "./format";
import { h, fill } from "./dom";
import { type Board, type Feed, burnPerHour, insightFor } from "./state";

export function agentName(board: Board, id: string | null): string {
  if (!id) return "—";
  return board.agents.get(id)?.name ?? short(id, 6);
}

export function isAdmin(board: Board): boolean {
  return board.role === "owner" || board.role === "admin";
}

function figure(label: string, value: string, testid?: string, micros?: number): HTMLElement {
  return h("div", { class: "figure" }, h("span", { class: "label" }, label),
           h("span", { class: "value", "data-testid": testid, "data-micros": micros }, value));
}

export function renderWallet(el: Element, board: Board): void {
  const w = board.wallet;
  if (!w) {
    fill(el, h("p", { class: "muted" }, "Loading the wallet…"));
    return;
  }
  const burn = burnPerHour(board);
  const runwayInsight = insightFor(board, "wallet_runway");
  let runway: string;
  if (runwayInsight?.evidence?.exhausts_at) {
    runway = `runs out ${new Date(runwayInsight.evidence.exhausts_at).toLocaleString()}`;
  } else if (burn > 0) {
    runway = `≈ ${duration((w.available_micros / burn) * 3_600_000)} at ${usdc(burn)}/h`;
  } else {
    runway = "no spend in the last hour";
  }
  fill(el,
       figure("Available", `${usdc(w.available_micros)} USDC`, "wallet-available", w.available_micros),
       h("div", { class: "figures" },
         figure("Balance", usdc(w.balance_micros), "wallet-balance", w.balance_micros),
         figure("Reserved", usdc(w.reserved_micros), "wallet-reserved", w.reserved_micros),
         figure("Runway", runway, "wallet-runway")),
       lastHour(board),
       w.deposit_address ? h("p", { class: "muted mono", title: w.deposit_address },
                             "Deposit address ", short(w.deposit_address, 12)) : null);
}

function lastHour(board: Board, now = Date.now()): HTMLElement {
  const recent = [...board.requests.values()].filter((r) => now - Date.parse(r.created_at) <= 3_600_000);
  const count = (test: (status: string) => boolean) => recent.filter((r) => test(r.status)).length;
  return h("div", { class: "figures" },
    figure("Requests, last hour", String(recent.length), "requests-hour"),
    figure("Settled", String(count((s) => s === "settled"))),
    figure("Refused or failed", String(count((s) => ["rejected", "failed", "expired"].includes(s)))));
}

function forecast(budget: any, now = Date.now()): number | null {
  if (!budget.period_end || budget.period === "total") return null;
  const start = Date.parse(budget.period_start);
  const end = Date.parse(budget.period_end);
  const elapsed = now - start;
  if (elapsed < 60_000 || end <= start) return null;
  return Math.round((budget.spent_micros * (end - start)) / elapsed);
}

export function renderBudgets(el: Element, board: Board, onDelete: (id: string) => void): void {
  const budgets = [...board.budgets.values()].sort((a, b) => a.name.localeCompare(b.name));
  if (!budgets.length) {
    fill(el, h("p", { class: "muted" }, "No budgets yet."));
    return;
  }
  fill(el, budgets.map((b) => {
    const limit = Math.max(1, b.limit_micros);
    const spentPct = Math.min(100, (b.spent_micros * 100) / limit);
    const reservedPct = Math.min(100 - spentPct, (b.reserved_micros * 100) / limit);
    const spent = h("span", { class: "spent" });
    const reserved = h("span", { class: "reserved" });
    spent.style.width = `${spentPct}%`;
    reserved.style.width = `${reservedPct}%`;
    const projected = forecast(b);
    const insight = insightFor(board, "budget_forecast", (s) => s.budget_id === b.id);
    const threshold = board.thresholds.get(b.id) ?? (b.alerted?.length ? Math.max(...b.alerted) : undefined);
    return h("div", { class: "budget", "data-testid": `budget-${b.id}`, "data-spent-micros": b.spent_micros,
                      "data-reserved-micros": b.reserved_micros, "data-limit-micros": b.limit_micros },
      h("div", { class: "row" },
        h("strong", {}, b.name),
        h("span", { class: "muted" }, ` ${b.period}${b.agent_id ? ` · agent ${agentName(board, b.agent_id)}` : ""}`),
        threshold ? h("span", { class: "badge warn" }, `${threshold}% reached`) : null,
        isAdmin(board) ? h("button", { class: "link", title: "delete this budget",
                                       onclick: () => onDelete(b.id) }, "delete") : null),
      h("div", { class: "bar", role: "progressbar", "aria-valuenow": Math.round(spentPct),
                 "aria-valuemin": 0, "aria-valuemax": 100 }, spent, reserved),
      h("div", { class: "row small" },
        h("span", { "data-role": "spent" }, `spent ${usdc(b.spent_micros)}`),
        h("span", {}, ` · reserved ${usdc(b.reserved_micros)}`),
        h("span", {}, ` · limit ${usdc(b.limit_micros)}`),
        projected !== null ? h("span", { class: projected > b.limit_micros ? "over" : "" },
                               ` · forecast ${usdc(projected)} by period end`) : null),
      insight ? h("div", { class: "small over" }, insight.message) : null);
  }));
}

function outcomeBadge(row: Feed): HTMLElement {
  const outcome = row.outcome ?? "…";
  const cls = { APPROVED: "ok", REJECTED: "bad", REQUIRES_REVIEW: "warn" }[outcome] ?? "";
  return h("span", { class: `badge ${cls}` }, outcome.replace("_", " ").toLowerCase());
}

function latency(row: Feed): number | null {
  if (!row.settled_at || !["settled", "failed"].includes(row.status)) return null;
  return Date.parse(row.settled_at) - Date.parse(row.created_at);
}

export function renderFeed(el: Element, board: Board): void {
  const rows = [...board.requests.values()].sort((a, b) => b.created_at.localeCompare(a.created_at)).slice(0, 100);
  if (!rows.length) {
    fill(el, h("li", { class: "muted empty" }, "No requests yet: call the gateway with a project key."));
    return;
  }
  fill(el, rows.map((row) => h("li", { "data-request-id": row.id, "data-status": row.status, class: "req" },
    h("span", { class: "when muted", title: row.created_at }, ago(row.created_at)),
    h("span", { class: "model mono" }, row.model),
    h("span", { class: "agent" }, agentName(board, row.agent_id)),
    outcomeBadge(row),
    h("span", { class: `status s-${row.status}` }, row.status.replace("_", " ")),
    h("span", { class: "risk", title: row.risk_factors.map((f) => `${f.type}: ${f.description}`).join("\n") },
      row.risk_score === null ? "risk —" : `risk ${row.risk_score.toFixed(1)}`,
      row.risk_factors.length ? h("small", { class: "muted" },
        ` (${row.risk_factors.map((f) => f.type).join(", ")})`) : null),
    h("span", { class: "cost mono", "data-role": "cost" },
      row.cost_micros !== null && ["settled", "failed"].includes(row.status)
        ? usdc(row.cost_micros) : `est. ${usdc(row.estimated_cost_micros)}`),
    h("span", { class: "latency muted" }, duration(latency(row))),
    row.status === "rejected" || row.status === "failed" || row.error
      ? h("div", { class: "why small" }, row.error?.message ?? row.reasons.map((r) => r.message).join("; "))
      : null)));
}

export function renderApprovals(el: Element, board: Board,
                                resolve: (id: string, how: "approve" | "reject") => void): void {
  const held = [...board.approvals.values()].sort((a, b) => (a.created_at ?? "").localeCompare(b.created_at ?? ""));
  if (!held.length) {
    fill(el, h("p", { class: "muted" }, "Nothing waits for review."));
    return;
  }
  const admin = isAdmin(board);
  fill(el, held.map((a) => h("div", { class: "approval", "data-approval-id": a.request_id },
    h("div", { class: "row" },
      h("span", { class: "mono" }, a.model ?? ""), h("span", {}, ` · ${agentName(board, a.agent_id)}`),
      h("strong", {}, ` · ${usdc(a.estimated_cost_micros)}`),
      typeof a.risk_score === "number" ? h("span", { class: "muted" }, ` · risk ${a.risk_score.toFixed(1)}`) : null),
    h("div", { class: "small muted" }, (a.reasons ?? []).map((r: any) => r.message).join("; ")),
    h("div", { class: "row" },
      h("button", { class: "ok", "data-testid": `approval-${a.request_id}-approve`, disabled: !admin,
                    onclick: () => resolve(a.request_id, "approve") }, "Approve"),
      h("button", { class: "bad", "data-testid": `approval-${a.request_id}-reject`, disabled: !admin,
                    onclick: () => resolve(a.request_id, "reject") }, "Reject"),
      a.expires_at ? h("span", { class: "small muted" }, ` expires ${new Date(a.expires_at).toLocaleTimeString()}`)
        : null))));
}

export function renderPayments(el: Element, board: Board): void {
  const rows = [
    ...[...board.deposits.values()].map((d) => ({ ...d, what: "deposit" })),
    ...[...board.payments.values()].map((p) => ({ ...p, what: p.kind ?? "payout" })),
  ].sort((a, b) => (b.created_at ?? "").localeCompare(a.created_at ?? "")).slice(0, 50);
  if (!rows.length) {
    fill(el, h("li", { class: "muted empty" }, "No payments or deposits yet."));
    return;
  }
  fill(el, rows.map((p) => h("li", { "data-payment-id": p.id, class: "payment" },
    h("span", { class: `badge ${p.what === "deposit" ? "ok" : ""}` }, p.what),
    h("strong", {}, p.what === "deposit" ? `+${usdc(p.amount_micros)}` : `−${usdc(p.amount_micros)}`),
    h("span", { class: `status s-${p.status}` }, p.status ?? ""),
    h("span", { class: "mono small", title: p.tx_hash ?? "" }, short(p.tx_hash)),
    p.block_number ? h("span", { class: "muted small" }, ` block ${p.block_number}`) : null,
    h("span", { class: "muted small" }, ` ${ago(p.created_at)}`))));
}

export function renderInsights(el: Element, board: Board,
                               act: (id: string, how: "acknowledge" | "dismiss") => void): void {
  if (board.insights === null) {
    fill(el, h("li", { class: "muted empty" }, "Insights are not available on this server."));
    return;
  }
  const open = [...board.insights.values()].sort((a, b) => (b.updated_at ?? "").localeCompare(a.updated_at ?? ""));
  if (!open.length) {
    fill(el, h("li", { class: "muted empty" }, "No open insights."));
    return;
  }
  const canAct = board.role !== "viewer";
  fill(el, open.map((i) => h("li", { "data-insight-id": i.id, class: `insight sev-${i.severity}` },
    h("div", { class: "row" }, h("span", { class: `badge sev-${i.severity}` }, i.severity),
      h("strong", {}, ` ${i.title ?? i.kind}`)),
    h("div", { class: "small" }, i.message ?? ""),
    canAct ? h("div", { class: "row" },
      h("button", { "data-testid": `insight-${i.id}-acknowledge`, onclick: () => act(i.id, "acknowledge") },
        "Acknowledge"),
      h("button", { "data-testid": `insight-${i.id}-dismiss`, onclick: () => act(i.id, "dismiss") },
        "Dismiss")) : null)));
}
