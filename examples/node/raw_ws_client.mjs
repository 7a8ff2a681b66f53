#!/usr/bin/env node
// One spoken turn against an omnivox server with nothing but the `ws` package: the Realtime protocol by
// hand (Bearer auth header, `OpenAI-Beta: realtime=v1` for the beta dialect, one JSON object per frame).
//
//   npm ci && node raw_ws_client.mjs --url http://127.0.0.1:8000 --say "What time is it?" --out answer.wav

import { once } from 'node:events';

import WebSocket from 'ws';

import { exitWith, runVoiceTurn } from './lib/cli.mjs';
import { serverBase } from './lib/realtime.mjs';

async function connect(options, onEvent, onClose) {
  const url = `${serverBase(options.url).ws}/v1/realtime?model=${encodeURIComponent(options.model)}`;
  const headers = {
    Authorization: `Bearer ${options['api-key']}`,
    ...(options.beta ? { 'OpenAI-Beta': 'realtime=v1' } : {}),
  };
  const socket = new WebSocket(url, { headers, perMessageDeflate: false });
  socket.on('message', (data) => onEvent(JSON.parse(data.toString())));
  socket.on('close', (code) => onClose(`the server closed the connection (${code})`));
  await once(socket, 'open').catch((error) => {
    throw new Error(`could not connect to ${url}: ${error.message}`);
  });
  return { send: (event) => socket.send(JSON.stringify(event)), close: () => socket.close() };
}

exitWith(() => runVoiceTurn({ description: 'One voice turn over a plain `ws` WebSocket, no SDK.', connect }));
