// Opening a Realtime connection with the official `openai` npm SDK against a self-hosted server.

import { once } from 'node:events';
import net from 'node:net';

import OpenAI from 'openai';
import { OpenAIRealtimeWS as BetaRealtimeWS } from 'openai/beta/realtime/ws';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';

import { serverBase } from './realtime.mjs';

/**
 * An SDK `OpenAIRealtimeWS` (GA, or the beta class) whose socket is open. The SDK always builds a
 * `wss:` URL; for a plain `http://`/`ws://` server the TCP connection is made by hand so the TLS layer
 * is skipped, while everything above it (headers, handshake, events) stays the SDK's own.
 * `onEvent` gets every server event, error events included; it is attached before the socket opens
 * because `session.created` can arrive in the same read as the handshake.
 */
export async function openSdkRealtime({ url, model = 'qwen-omni', apiKey = 'sk-local', beta = false }, onEvent) {
  const base = serverBase(url);
  const client = new OpenAI({ apiKey, baseURL: `${base.http}/v1` });
  const options = base.secure ? {} : { createConnection: (target) => net.connect(Number(target.port), target.host) };
  const RealtimeClass = beta ? BetaRealtimeWS : OpenAIRealtimeWS;
  const realtime = new RealtimeClass({ model, options }, client);
  realtime.on('event', onEvent);
  // Server error events already reach `onEvent`, and a failed connect is thrown below; only later
  // client-side failures (a frame that is not JSON, a socket error) are printed here. Without a
  // listener the SDK would raise all of them as unhandled rejections.
  let open = false;
  realtime.on('error', (error) => {
    if (open && !error.error) console.error(`realtime client error: ${error.message}`);
  });
  await once(realtime.socket, 'open').catch((error) => {
    throw new Error(`could not connect to ${base.ws}/v1/realtime: ${error.message}`);
  });
  open = true;
  return realtime;
}
