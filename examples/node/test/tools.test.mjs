// Function calling against a live omnivox server whose scripted engine has tool rules (tests/test_node_examples.py
// starts it): the caller's "weather" makes the agent call get_weather, and the answer is spoken from its output.
// @openai/agents-realtime runs a tool() itself; the official `openai` SDK sees the raw tool events on both dialects
// and parses the chat-completions tool-call stream.

import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';

import { OpenAIRealtimeWebSocket, RealtimeAgent, RealtimeSession, tool } from '@openai/agents-realtime';
import OpenAI from 'openai';
import { z } from 'zod';

import { REALTIME_RATE, pcm16Bytes, pcm16Samples } from '../lib/audio.mjs';
import { serverBase } from '../lib/realtime.mjs';
import { SERVER_URL, assertSpokenAnswer, needsServer, sdkSession, speech } from './support.mjs';

const QUESTION = 'What is the weather like?'; // pocketsphinx hears this one right in the espeak-ng voice node uses
const ANSWER = 'It is 21 degrees in Paris.';
const WEATHER_OUTPUT = JSON.stringify({ temperature: 21, sky: 'clear' });
const WEATHER_TOOL = {
  type: 'function',
  name: 'get_weather',
  description: 'The current weather in a city',
  parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
};

const AGENT_TITLE = 'agents-realtime: a spoken question, the SDK runs the tool, the agent speaks its result';

test(AGENT_TITLE, needsServer, async () => {
  const calls = [];
  const getWeather = tool({
    name: 'get_weather',
    description: 'The current weather in a city',
    parameters: z.object({ city: z.string() }),
    execute: async ({ city }) => {
      calls.push(city);
      return WEATHER_OUTPUT;
    },
  });
  const instructions = 'Answer with the weather tool.';
  const agent = new RealtimeAgent({ name: 'weather', instructions, tools: [getWeather] });
  const transport = new OpenAIRealtimeWebSocket({ url: `${serverBase(SERVER_URL).ws}/v1/realtime?model=gpt-realtime` });
  const session = new RealtimeSession(agent, { transport, model: 'gpt-realtime' });
  const order = [];
  const errors = [];
  const audio = [];
  session.on('agent_tool_start', () => order.push('tool_start'));
  session.on('agent_tool_end', () => order.push('tool_end'));
  session.on('error', (event) => errors.push(event));
  session.on('audio', (event) => {
    if (order.includes('tool_end')) audio.push(Buffer.from(event.data));
  });
  const answered = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no spoken answer; events ${order.join(', ')}`)), 30_000);
    session.on('history_updated', (history) => {
      const spoken = history.filter((item) => item.type === 'message' && item.role === 'assistant');
      const transcripts = spoken.flatMap((item) => item.content.map((part) => part.transcript ?? part.text));
      if (transcripts.includes(ANSWER) && spoken.at(-1).status === 'completed') {
        clearTimeout(timer);
        resolve(transcripts);
      }
    });
  });
  await session.connect({ apiKey: 'sk-local' });
  try {
    const silence = new Int16Array(REALTIME_RATE * 0.3);
    const caller = pcm16Bytes(Int16Array.from([...silence, ...speech(QUESTION), ...silence, ...silence, ...silence]));
    const chunk = (REALTIME_RATE / 50) * 2; // 20 ms of PCM16, sent at the pace a microphone makes it
    for (let start = 0; start < caller.length; start += chunk) {
      const piece = caller.subarray(start, start + chunk);
      session.sendAudio(piece.buffer.slice(piece.byteOffset, piece.byteOffset + piece.length));
      await sleep(20);
    }
    await answered;
  } finally {
    session.close();
  }
  assert.deepEqual(calls, ['Paris']);
  assert.deepEqual(order, ['tool_start', 'tool_end']);
  assert.deepEqual(errors, []);
  const seconds = pcm16Samples(Buffer.concat(audio)).length / REALTIME_RATE;
  assert.ok(seconds > 1, `the answer after the tool lasts ${seconds.toFixed(2)} s`);
});

/** The call, its output and the spoken answer, with the SDK class of `dialect` and no agent framework. */
async function rawToolEvents(dialect) {
  const beta = dialect === 'beta';
  const { realtime, log, close } = await sdkSession({ beta });
  try {
    const session = beta
      ? { tools: [WEATHER_TOOL], turn_detection: null }
      : { type: 'realtime', tools: [WEATHER_TOOL], audio: { input: { turn_detection: null } } };
    realtime.send({ type: 'session.update', session });
    assert.deepEqual((await log.next('session.updated')).session.tools, [WEATHER_TOOL]);
    const text = { type: 'message', role: 'user', content: [{ type: 'input_text', text: QUESTION }] };
    realtime.send({ type: 'conversation.item.create', item: text });
    realtime.send({ type: 'response.create' });
    const added = await log.next(log.names.itemCreated);
    assert.equal(added.item.type, 'message');
    const callAdded = await log.next(log.names.itemCreated);
    const { type, status, arguments: args } = callAdded.item;
    assert.deepEqual([type, status, args], ['function_call', 'in_progress', ''], 'announced before its arguments');
    const delta = await log.next('response.function_call_arguments.delta');
    const done = await log.next('response.function_call_arguments.done');
    assert.equal(done.name, 'get_weather');
    assert.deepEqual(JSON.parse(done.arguments), { city: 'Paris' });
    assert.equal(delta.delta, done.arguments);
    const first = await log.next('response.done');
    assert.equal(first.response.status, 'completed');
    assert.deepEqual(
      first.response.output.map((item) => [item.type, item.call_id, item.status]),
      [['function_call', done.call_id, 'completed']],
    );
    const output = { type: 'function_call_output', call_id: done.call_id, output: WEATHER_OUTPUT };
    realtime.send({ type: 'conversation.item.create', item: output });
    realtime.send({ type: 'response.create' });
    const answer = await log.next('response.done');
    assert.equal(answer.response.status, 'completed');
    assert.equal(assertSpokenAnswer(log, answer.response.id).transcript, ANSWER);
    assert.deepEqual(log.ofType('error'), []);
  } finally {
    close();
  }
}

test('openai SDK (GA class): raw function-call events, the output, the spoken answer', needsServer, () =>
  rawToolEvents('ga'),
);

test('openai SDK (beta class): raw function-call events, the output, the spoken answer', needsServer, () =>
  rawToolEvents('beta'),
);

test('openai SDK: the chat-completions tool-call stream, parsed by the SDK, then the answer', needsServer, async () => {
  const client = new OpenAI({ apiKey: 'sk-local', baseURL: `${serverBase(SERVER_URL).http}/v1` });
  const tools = [{ type: 'function', function: { ...WEATHER_TOOL, type: undefined } }];
  const messages = [{ role: 'user', content: QUESTION }];
  const stream = client.chat.completions.stream({ model: 'gpt-4o', messages, tools });
  const completion = await stream.finalChatCompletion();
  const choice = completion.choices[0];
  assert.equal(choice.finish_reason, 'tool_calls');
  const [call] = choice.message.tool_calls;
  assert.ok(call.id.startsWith('call_'));
  assert.equal(call.function.name, 'get_weather');
  assert.deepEqual(JSON.parse(call.function.arguments), { city: 'Paris' });
  messages.push(choice.message, { role: 'tool', tool_call_id: call.id, content: WEATHER_OUTPUT });
  const answer = await client.chat.completions.create({ model: 'gpt-4o', messages, tools });
  assert.equal(answer.choices[0].message.content, ANSWER);
});
