// chat_audio_client.mjs run as a user runs it: audio in (espeak-ng speech as an input_audio part), with a
// system message, history and an image, and audio out, streamed and whole; checked by its printout and WAV.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { buildMessages } from '../chat_audio_client.mjs';
import { REALTIME_RATE, decodeWav, peak } from '../lib/audio.mjs';
import { SERVER_URL, needsServer } from './support.mjs';

const run = promisify(execFile);
const exampleDir = fileURLToPath(new URL('..', import.meta.url));
const workDir = mkdtempSync(join(tmpdir(), 'omnivox-chat-audio-'));
after(() => rmSync(workDir, { recursive: true, force: true }));
// the smallest PNG: one transparent pixel
const PIXEL = Buffer.from(
  'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==',
  'base64',
);

async function runClient(args) {
  const out = join(workDir, `answer-${args.length}.wav`);
  const { stdout } = await run(process.execPath, ['chat_audio_client.mjs', '--url', SERVER_URL, '--out', out, ...args], {
    cwd: exampleDir,
    timeout: 30_000,
  });
  return { stdout, answer: decodeWav(readFileSync(out)) };
}

function assertSpokenAnswer({ stdout, answer }) {
  assert.match(stdout, /answer: [\d.]+ s of audio, transcript "\S/);
  assert.equal(answer.rate, REALTIME_RATE);
  assert.ok(answer.samples.length / REALTIME_RATE > 0.5, 'the saved answer is more than half a second long');
  assert.ok(peak(answer.samples) > 0.05, 'the saved answer is not silence');
}

test('the request has the NIM/vLLM shape: system, history, input_audio and image_url parts', () => {
  const messages = buildMessages({
    system: 'Be brief.',
    history: ['user:Hi', 'assistant:Hello: how can I help?'],
    audioWav: Buffer.from('RIFF'),
    text: 'Answer the question.',
    image: { path: 'photo.png', data: PIXEL },
  });
  assert.deepEqual(
    messages.map((m) => m.role),
    ['system', 'user', 'assistant', 'user'],
  );
  assert.equal(messages[2].content, 'Hello: how can I help?');
  assert.deepEqual(
    messages[3].content.map((part) => part.type),
    ['input_audio', 'text', 'image_url'],
  );
  assert.equal(messages[3].content[0].input_audio.format, 'wav');
  assert.match(messages[3].content[2].image_url.url, /^data:image\/png;base64,/);
});

describe('chat_audio_client.mjs', { ...needsServer, concurrency: true }, () => {
  test('streams a spoken answer to a spoken question with history and an image', async () => {
    const image = join(workDir, 'pixel.png');
    writeFileSync(image, PIXEL);
    const result = await runClient(['--say', 'What do you see?', '--image', image, '--system', 'Be brief.',
      '--history', 'user:Hi', '--history', 'assistant:Hello!']);
    assertSpokenAnswer(result);
    assert.match(result.stdout, /4 messages to /);
    assert.match(result.stdout, /latency: first audio \d+ ms/);
  });

  test('--no-stream gets the whole answer as one WAV', async () => {
    const result = await runClient(['--no-stream', '--say', 'Tell me a joke']);
    assertSpokenAnswer(result);
  });
});
