// @openai/agents-realtime's OpenAIRealtimeWebSocket transport against a live omnivox server. The transport
// zod-validates every server event and silently ignores the ones that fail, so a server event with a
// wrong shape would not crash anything: it would just never reach the agent. Here each event is checked
// against the transport's own schema, so such drops fail the test instead of going unnoticed.

import assert from 'node:assert/strict';
import { once } from 'node:events';
import { test } from 'node:test';

import { OpenAIRealtimeWebSocket } from '@openai/agents-realtime';

import { REALTIME_RATE, pcm16Bytes, pcm16Samples, peak } from '../lib/audio.mjs';
import { serverBase } from '../lib/realtime.mjs';
import { SERVER_URL, needsServer, speech } from './support.mjs';

/** The transport's server-event schema; the package does not export it, so it is loaded from its dist folder. */
async function serverEventSchema() {
  const schemaModule = new URL('./openaiRealtimeEvents.mjs', import.meta.resolve('@openai/agents-realtime'));
  const { realtimeServerEventSchema } = await import(schemaModule.href);
  const knownTypes = new Set(realtimeServerEventSchema.options.map((option) => option.shape.type.value));
  return { schema: realtimeServerEventSchema, knownTypes };
}

const TITLE = 'agents-realtime transport: a spoken manual turn, audio received, no server event dropped as invalid';

test(TITLE, needsServer, async () => {
  const { schema, knownTypes } = await serverEventSchema();
  const url = `${serverBase(SERVER_URL).ws}/v1/realtime?model=qwen-node-test`;
  const transport = new OpenAIRealtimeWebSocket({ url });
  const received = [];
  const audio = [];
  const transportErrors = [];
  transport.on('*', (event) => received.push(event));
  transport.on('audio', (event) => audio.push(Buffer.from(event.data)));
  transport.on('error', (event) => transportErrors.push(event));
  const turnDone = once(transport, 'turn_done', { signal: AbortSignal.timeout(15_000) });
  try {
    await transport.connect({
      apiKey: 'sk-local',
      model: 'qwen-node-test',
      initialSessionConfig: { instructions: 'be brief', audio: { input: { turnDetection: null } } },
    });
    const caller = pcm16Bytes(speech('Hello, can you hear me?'));
    transport.sendAudio(caller.buffer.slice(caller.byteOffset, caller.byteOffset + caller.length), { commit: true });
    transport.sendEvent({ type: 'response.create' });
    const [done] = await turnDone;
    assert.equal(done.response.output[0]?.type, 'message');
  } finally {
    transport.close();
  }

  const invalid = received
    .filter((event) => knownTypes.has(event.type))
    .map((event) => ({ event, result: schema.safeParse(event) }))
    .filter(({ result }) => !result.success)
    .map(({ event, result }) => `${event.type}: ${result.error.message}`);
  assert.deepEqual(invalid, [], 'every server event passes the transport schema');
  const unknown = received.map((event) => event.type).filter((type) => !knownTypes.has(type));
  assert.deepEqual(unknown, [], 'the server sends no event type the transport does not know');
  assert.ok(received.some((event) => event.type === 'session.updated'), 'the initial session config was accepted');
  assert.deepEqual(transportErrors, []);

  const answer = pcm16Samples(Buffer.concat(audio));
  const seconds = answer.length / REALTIME_RATE;
  assert.ok(seconds > 0.5 && seconds < 10, `the transport delivered ${seconds.toFixed(2)} s of 24 kHz audio`);
  assert.ok(peak(answer) > 0.05, 'the delivered audio is not silence');
});
