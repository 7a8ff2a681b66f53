// The official `openai` npm SDK (OpenAIRealtimeWS, GA and beta classes) against a live omnivox server:
// conformance cases C1, C3, C4, C5, C11, C16 and C17 of the wire contract.

import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, test } from 'node:test';

import {
  assertSpokenAnswer,
  needsServer,
  responseSkeleton,
  sayAndCommit,
  sdkSession,
  useManualTurns,
} from './support.mjs';

const GA_RESPONSE_SEQUENCE = [
  'response.created',
  'response.output_item.added',
  'conversation.item.added',
  'response.content_part.added',
  'response.output_audio.done',
  'response.output_audio_transcript.done',
  'response.content_part.done',
  'response.output_item.done',
  'conversation.item.done',
  'response.done',
];

const BETA_RESPONSE_SEQUENCE = [
  'response.created',
  'response.output_item.added',
  'conversation.item.created',
  'response.content_part.added',
  'response.audio.done',
  'response.audio_transcript.done',
  'response.content_part.done',
  'response.output_item.done',
  'response.done',
];

/** The session.update @openai/agents-realtime sends on connect, then its tracing one (protocols.md 1.4). */
const AGENTS_SESSION_UPDATE = {
  type: 'session.update',
  session: {
    type: 'realtime',
    model: 'qwen-node-test',
    output_modalities: ['audio'],
    instructions: 'be brief',
    audio: {
      input: {
        format: { type: 'audio/pcm', rate: 24000 },
        noise_reduction: null,
        transcription: { model: 'gpt-4o-mini-transcribe' },
        turn_detection: { type: 'semantic_vad' },
      },
      output: { format: { type: 'audio/pcm', rate: 24000 }, voice: 'ash', speed: 1 },
    },
    tools: [],
  },
};

/** Runs `body` with a fresh SDK session and always closes it. */
async function withSession(options, body) {
  const session = await sdkSession(options);
  try {
    await session.log.next('session.created');
    return await body(session);
  } finally {
    session.close();
  }
}

function assertUniqueStringEventIds(log) {
  const ids = log.events.map((event) => event.event_id);
  assert.ok(
    ids.every((id) => typeof id === 'string' && id.length > 0),
    'every server event has a string event_id',
  );
  assert.equal(new Set(ids).size, ids.length, 'event_ids are unique');
}

describe('openai npm SDK, GA OpenAIRealtimeWS', needsServer, () => {
  test('C1: session.created comes first, unprompted, with a GA session and a string event_id', async () => {
    await withSession({ model: 'qwen-c1' }, async ({ log }) => {
      const [first] = log.events;
      assert.equal(first.type, 'session.created');
      assert.equal(typeof first.event_id, 'string');
      assert.equal(first.session.type, 'realtime');
      assert.equal(first.session.model, 'qwen-c1', 'the requested model is echoed');
      assert.deepEqual(first.session.audio.output.format, { type: 'audio/pcm', rate: 24000 });
    });
  });

  test('C4: the agents-realtime session.update pair gives two session.updated and no error', async () => {
    await withSession({}, async ({ realtime, log }) => {
      realtime.send(AGENTS_SESSION_UPDATE);
      realtime.send({ type: 'session.update', session: { type: 'realtime', tracing: 'auto' } });
      const first = await log.next('session.updated');
      const second = await log.next('session.updated');
      assert.equal(first.session.instructions, 'be brief');
      assert.equal(first.session.audio.output.voice, 'ash');
      assert.equal(second.session.instructions, 'be brief', 'the tracing update merges, it does not reset');
      const manual = await useManualTurns({ realtime, log }, 'ga');
      assert.equal(manual.session.audio.input.turn_detection, null, 'turn_detection:null switches to manual turns');
      assert.deepEqual(log.ofType('error'), []);
    });
  });

  test('C5: a spoken manual turn gets the canonical response sequence and a consistent spoken answer', async () => {
    await withSession({}, async (session) => {
      const { realtime, log } = session;
      await useManualTurns(session, 'ga');
      const committed = await sayAndCommit(session, 'What is the capital of France?');
      const userItemAdded = await log.next('conversation.item.added');
      const userItemDone = await log.next('conversation.item.done');
      for (const event of [userItemAdded, userItemDone]) {
        assert.equal(event.item.id, committed.item_id, 'the user item is the committed one');
        assert.equal(event.item.role, 'user');
        assert.equal(event.item.content[0].type, 'input_audio');
      }
      realtime.send({ type: 'response.create' });
      const done = await log.next('response.done');
      assert.equal(done.response.status, 'completed');
      assert.deepEqual(responseSkeleton(log, done.response.id), GA_RESPONSE_SEQUENCE);
      const answer = assertSpokenAnswer(log, done.response.id);
      const itemDone = log.ofType('response.output_item.done').at(-1);
      assert.deepEqual(itemDone.item.content[0], { type: 'output_audio', transcript: answer.transcript });
      assertUniqueStringEventIds(log);
      assert.deepEqual(log.ofType('error'), []);
    });
  });

  test('C11: response.cancel mid-response ends it cancelled; a second cancel is an error', async () => {
    await withSession({}, async ({ realtime, log }) => {
      realtime.send({ type: 'response.create' });
      await log.next('response.output_audio.delta');
      realtime.send({ type: 'response.cancel' });
      const done = await log.next('response.done');
      assert.equal(done.response.status, 'cancelled');
      assert.equal(done.response.status_details?.type, 'cancelled');
      await sleep(300);
      const after = log.events.slice(log.events.indexOf(done) + 1);
      assert.deepEqual(
        after.filter((event) => event.response_id === done.response.id),
        [],
        'nothing of the response follows its response.done',
      );
      realtime.send({ type: 'response.cancel', event_id: 'node_cancel_again' });
      const error = await log.next('error');
      assert.equal(error.error.code, 'response_cancel_not_active');
      assert.equal(error.error.event_id, 'node_cancel_again', 'C17: the client event_id is echoed');
    });
  });

  test('C16: an unknown event type and invalid JSON are errors, and the socket stays usable', async () => {
    await withSession({}, async ({ realtime, log }) => {
      realtime.send({ type: 'no_such.event', event_id: 'node_unknown_1' });
      const unknown = await log.next('error');
      assert.equal(unknown.error.type, 'invalid_request_error');
      assert.equal(unknown.error.event_id, 'node_unknown_1');
      realtime.socket.send('{not json');
      const malformed = await log.next('error');
      assert.equal(malformed.error.type, 'invalid_request_error');
      await useManualTurns({ realtime, log }, 'ga');
      assert.equal(realtime.socket.readyState, realtime.socket.OPEN);
    });
  });
});

describe('openai npm SDK, beta OpenAIRealtimeWS (OpenAI-Beta: realtime=v1)', needsServer, () => {
  test('C3 + C5: beta session shape and a spoken turn in beta event names only', async () => {
    await withSession({ beta: true }, async (session) => {
      const { realtime, log } = session;
      const created = log.events[0];
      assert.equal(created.type, 'session.created');
      assert.equal(created.session.input_audio_format, 'pcm16');
      assert.equal(created.session.output_audio_format, 'pcm16');
      assert.ok(Array.isArray(created.session.modalities), 'beta sessions list modalities');
      assert.equal(created.session.audio, undefined, 'no GA audio block in a beta session');
      const updated = await useManualTurns(session, 'beta');
      assert.equal(updated.session.turn_detection, null);
      const committed = await sayAndCommit(session, 'Good morning, how are you?');
      const userItem = await log.next('conversation.item.created');
      assert.equal(userItem.item.id, committed.item_id);
      realtime.send({ type: 'response.create' });
      const done = await log.next('response.done');
      assert.equal(done.response.status, 'completed');
      assert.deepEqual(responseSkeleton(log, done.response.id), BETA_RESPONSE_SEQUENCE);
      const answer = assertSpokenAnswer(log, done.response.id);
      const itemDone = log.ofType('response.output_item.done').at(-1);
      assert.deepEqual(itemDone.item.content[0], { type: 'audio', transcript: answer.transcript });
      const gaOnly = log.types().filter((type) => type.includes('output_audio') || type === 'conversation.item.added');
      assert.deepEqual(gaOnly, [], 'no GA event names on a beta connection');
      assertUniqueStringEventIds(log);
    });
  });
});
