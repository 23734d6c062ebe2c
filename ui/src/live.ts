// The live layer: one websocket (Socket.IO multiplexes the namespaces over it), /budgets and
// /payments subscribed to the project, /chat for the assistant. Each namespace remembers the last
// seq it saw: on every (re)connect it subscribes with `since` = that seq, so the server replays
// what was missed, and any seq already seen is dropped, so nothing is applied twice.

import { Manager, type Socket } from "socket.io-client";

export interface Envelope {
  id: string;
  project_id: string;
  seq: number;
  type: string;
  ts: string;
  actor: string;
  data: any;
}

export type LiveState = "connecting" | "live" | "reconnecting" | "signed out";
const SUBSCRIBED = ["/budgets", "/payments"] as const;

export class Live {
  readonly chat: Socket;
  private readonly manager: Manager;
  private readonly sockets = new Map<string, Socket>();
  private readonly lastSeq = new Map<string, number>();
  private readonly ready = new Set<string>();
  private closed = false;

  constructor(token: string, private readonly projectId: string, since: number,
              private readonly onEvent: (namespace: string, event: Envelope) => void,
              private readonly onState: (state: LiveState, detail?: string) => void,
              onChat: (type: string, data: any) => void) {
    this.manager = new Manager(location.origin, {
      transports: ["websocket"], reconnectionDelay: 300, reconnectionDelayMax: 2000, randomizationFactor: 0.2,
    });
    for (const namespace of SUBSCRIBED) {
      this.lastSeq.set(namespace, since);
      const socket = this.manager.socket(namespace, { auth: { token } });
      this.sockets.set(namespace, socket);
      socket.on("connect", () => void this.subscribe(namespace, socket));
      socket.on("disconnect", () => this.lost(namespace));
      socket.on("connect_error", (err: Error) => this.refused(socket, err));
      socket.onAny((type: string, envelope: Envelope) => {
        const last = this.lastSeq.get(namespace) ?? 0;
        if (!envelope || typeof envelope.seq !== "number" || envelope.seq <= last) return; // seen already
        this.lastSeq.set(namespace, envelope.seq);
        this.onEvent(namespace, envelope);
      });
    }
    this.chat = this.manager.socket("/chat", { auth: { token } });
    this.chat.on("connect", () => { this.ready.add("/chat"); this.report(); });
    this.chat.on("disconnect", () => this.lost("/chat"));
    this.chat.on("connect_error", (err: Error) => this.refused(this.chat, err));
    this.chat.onAny((type: string, payload: any) => {
      if (!type.startsWith("chat.")) return;
      // The contract names the payload's fields; accept them bare or inside an event envelope.
      const enveloped = payload && typeof payload === "object" && "type" in payload && "data" in payload;
      onChat(type, enveloped ? payload.data : payload);
    });
    this.onState("connecting");
  }

  seq(namespace: string): number {
    return this.lastSeq.get(namespace) ?? 0;
  }

  close(): void {
    this.closed = true;
    for (const socket of this.sockets.values()) socket.disconnect();
    this.chat.disconnect();
    this.manager.engine?.close();
  }

  private async subscribe(namespace: string, socket: Socket): Promise<void> {
    try {
      const ack: any = await socket.timeout(15000).emitWithAck(
        "subscribe", { project_id: this.projectId, since: this.seq(namespace) });
      if (!ack?.ok) {
        this.onState("reconnecting", ack?.error?.message ?? "subscribe refused");
        return;
      }
      // Every event up to ack.seq has been sent before the ack: nothing at or below it is news.
      if (typeof ack.seq === "number" && ack.seq > this.seq(namespace)) this.lastSeq.set(namespace, ack.seq);
      this.ready.add(namespace);
      this.report();
    } catch {
      if (socket.connected) socket.disconnect().connect(); // no answer in time: start over
    }
  }

  private lost(namespace: string): void {
    this.ready.delete(namespace);
    if (!this.closed) this.onState("reconnecting");
  }

  private refused(socket: Socket, err: Error): void {
    if (this.closed) return;
    // A refusal by the server (bad or expired token) stops the retries; a network error does not.
    if (!socket.active) this.onState("signed out", err.message);
    else this.onState("reconnecting", err.message);
  }

  private report(): void {
    if (this.closed) return;
    const all = SUBSCRIBED.every((ns) => this.ready.has(ns)) && this.ready.has("/chat");
    this.onState(all ? "live" : "reconnecting");
  }
}
