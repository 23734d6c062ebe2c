// Spend over time: the cumulative settled cost of the requests in the feed, one line per model or
// per agent. Rebuilt (at most once a second) when the feed changes.

import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { h, fill } from "./dom";
import type { Board } from "./state";
import { agentName } from "./panels";
import { usdc } from "./format";

const COLORS = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

export class SpendChart {
  private plot: uPlot | null = null;
  by: "model" | "agent" = "model";

  constructor(private readonly el: HTMLElement) {}

  render(board: Board): void {
    const settled = [...board.requests.values()]
      .filter((r) => r.status === "settled" && r.settled_at && (r.cost_micros ?? 0) > 0)
      .sort((a, b) => a.settled_at!.localeCompare(b.settled_at!));
    this.plot?.destroy();
    this.plot = null;
    if (!settled.length) {
      fill(this.el, h("p", { class: "muted" }, "Spend appears here as requests settle."));
      return;
    }
    const key = (r: (typeof settled)[number]) => (this.by === "model" ? r.model : agentName(board, r.agent_id));
    const names = [...new Set(settled.map(key))].slice(0, COLORS.length);
    // every line starts at zero just before the first settlement
    const xs: number[] = [Date.parse(settled[0].settled_at!) / 1000 - 1];
    const ys: number[][] = names.map(() => [0]);
    const totals = names.map(() => 0);
    for (const r of settled) {
      const i = names.indexOf(key(r));
      if (i < 0) continue;
      totals[i] += r.cost_micros ?? 0;
      xs.push(Date.parse(r.settled_at!) / 1000);
      names.forEach((_, j) => ys[j].push(totals[j] / 1_000_000));
    }
    fill(this.el);
    const width = Math.max(280, this.el.clientWidth || 560);
    this.plot = new uPlot({
      width, height: 220,
      // at least a minute wide, so a handful of points does not stretch over years
      scales: { x: { time: true, range: (_u, min, max) => (max - min < 60 ? [max - 60, max + 2] : [min, max]) } },
      axes: [{}, { values: (_u, ticks) => ticks.map((t) => usdc(Math.round(t * 1_000_000))), size: 80 }],
      series: [{}, ...names.map((name, i) => ({
        label: name, stroke: COLORS[i], width: 2,
        value: (_u: uPlot, v: number | null) => (v === null ? "—" : usdc(Math.round(v * 1_000_000))),
      }))],
    }, [xs, ...ys], this.el);
  }
}
