#!/usr/bin/env node
// One spoken turn with the official `openai` npm SDK (OpenAIRealtimeWS) against an omnivox server:
// sends a WAV file or espeak-ng speech, prints the server events and latency, saves (and plays) the answer.
//
//   npm ci && node realtime_openai_sdk.mjs --url http://127.0.0.1:8000 --say "Tell me a joke" --play
//   node realtime_openai_sdk.mjs --wav question.wav --out answer.wav --beta   # the beta class and dialect

import { exitWith, runVoiceTurn } from './lib/cli.mjs';
import { openSdkRealtime } from './lib/sdk.mjs';

async function connect(options, onEvent, onClose) {
  const realtime = await openSdkRealtime(
    { url: options.url, model: options.model, apiKey: options['api-key'], beta: options.beta },
    onEvent,
  );
  realtime.socket.on('close', (code) => onClose(`the server closed the connection (${code})`));
  return { send: (event) => realtime.send(event), close: () => realtime.close() };
}

exitWith(() =>
  runVoiceTurn({ description: 'One voice turn with the openai npm SDK (OpenAIRealtimeWS).', connect }),
);
