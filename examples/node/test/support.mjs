// Shared by the node:test files: where the server under test is, SDK sessions recorded in an EventLog,
// caller speech, and the checks every spoken answer must pass.

import assert from 'node:assert/strict';

import { REALTIME_RATE, peak, synthesizeSpeech } from '../lib/audio.mjs';
import { EventLog, manualSessionUpdate, speechTurn } from '../lib/realtime.mjs';
import { openSdkRealtime } from '../lib/sdk.mjs';

/** Root URL of a running omnivox server; tests/test_node_examples.py starts one and sets it. */
export const SERVER_URL = process.env.OMNIVOX_TEST_URL;

/** node:test `skip` option: skip everything, saying why, when no server was given. */
export const needsServer = SERVER_URL
  ? {}
  : { skip: 'OMNIVOX_TEST_URL is not set (run through pytest tests/test_node_examples.py, or point it at a server)' };

const speechCache = new Map();

/** espeak-ng speech at 24 kHz, made once per text. */
export function speech(text) {
  if (!speechCache.has(text)) speechCache.set(text, synthesizeSpeech(text));
  return speechCache.get(text);
}

/** An open SDK connection (GA or beta class) whose every server event lands in `log`. */
export async function sdkSession({ beta = false, model = 'qwen-node-test' } = {}) {
  const log = new EventLog(beta ? 'beta' : 'ga');
  const realtime = await openSdkRealtime({ url: SERVER_URL, model, beta }, (event) => log.record(event));
  realtime.socket.on('close', (code) => log.close(`the server closed the connection (${code})`));
  return { realtime, log, close: () => realtime.close() };
}

/** Switches to manual turns and waits for the server to confirm. */
export async function useManualTurns({ realtime, log }, dialect) {
  realtime.send(manualSessionUpdate(dialect));
  return log.next('session.updated');
}

/** Sends one spoken caller turn and waits for it to be committed. */
export async function sayAndCommit({ realtime, log }, text) {
  speechTurn(speech(text)).forEach((event) => realtime.send(event));
  return log.next('input_audio_buffer.committed');
}

/** What every completed spoken answer must be: even-length PCM16 of real sound, transcript consistent. */
export function assertSpokenAnswer(log, responseId) {
  const answer = log.answer(responseId);
  assert.ok(answer.bytes.length > 0, 'the answer has audio');
  assert.equal(answer.bytes.length % 2, 0, 'PCM16 deltas add up to an even byte count');
  for (const delta of log.ofType(log.names.audioDelta)) {
    assert.equal(Buffer.from(delta.delta, 'base64').length % 2, 0, 'every audio delta holds whole samples');
  }
  const seconds = answer.samples.length / REALTIME_RATE;
  assert.ok(seconds > 0.5 && seconds < 10, `answer lasts ${seconds.toFixed(2)} s at 24 kHz`);
  assert.ok(peak(answer.samples) > 0.05, 'the answer is not silence');
  assert.ok(answer.transcript, 'the transcript is not empty');
  assert.equal(answer.transcriptDeltas, answer.transcript, 'transcript deltas concatenate to the final transcript');
  return answer;
}

/** Event types of one response in order, deltas left out: the canonical sequence to compare against. */
export function responseSkeleton(log, responseId) {
  const start = log.events.findIndex((event) => event.type === 'response.created' && event.response.id === responseId);
  const end = log.events.findIndex((event) => event.type === 'response.done' && event.response.id === responseId);
  assert.ok(start !== -1 && end > start, `response ${responseId} was created and done`);
  return log.events
    .slice(start, end + 1)
    .map((event) => event.type)
    .filter((type) => !type.endsWith('.delta') && type !== 'rate_limits.updated');
}
