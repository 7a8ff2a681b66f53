// The two example clients run as a user runs them: a child process per client, checked by its exit status,
// its printout and the answer WAV it saves.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { REALTIME_RATE, decodeWav, encodeWav, peak, resample } from '../lib/audio.mjs';
import { SERVER_URL, needsServer, speech } from './support.mjs';

const run = promisify(execFile);
const exampleDir = fileURLToPath(new URL('..', import.meta.url));
const workDir = mkdtempSync(join(tmpdir(), 'omnivox-node-examples-'));
after(() => rmSync(workDir, { recursive: true, force: true }));

/** Runs an example client to completion and returns its printout and the answer it saved. */
async function runClient(script, args) {
  const out = join(workDir, `${script}-${args.join('_').replace(/\W+/g, '')}.wav`);
  const { stdout } = await run(process.execPath, [script, '--url', SERVER_URL, '--out', out, ...args], {
    cwd: exampleDir,
    timeout: 20_000,
  });
  return { stdout, answer: decodeWav(readFileSync(out)) };
}

function assertSavedAnswer({ stdout, answer }, eventNames) {
  assert.match(stdout, /response\.done status=completed/);
  assert.match(stdout, /latency: commit -> committed \d+ ms .* -> first audio \d+ ms/);
  for (const name of eventNames) assert.ok(stdout.includes(`<- ${name}`), `the printout shows ${name}`);
  assert.equal(answer.rate, REALTIME_RATE);
  assert.ok(answer.samples.length / REALTIME_RATE > 0.5, 'the saved answer is more than half a second long');
  assert.ok(peak(answer.samples) > 0.05, 'the saved answer is not silence');
}

describe('example clients', { ...needsServer, concurrency: true }, () => {
  test('realtime_openai_sdk.mjs (GA) speaks an espeak-ng question and saves the answer', async () => {
    const result = await runClient('realtime_openai_sdk.mjs', ['--say', 'What is the weather like?']);
    assertSavedAnswer(result, ['session.created', 'response.output_audio.delta', 'conversation.item.done']);
  });

  test('realtime_openai_sdk.mjs --beta uses the beta class and dialect', async () => {
    const result = await runClient('realtime_openai_sdk.mjs', ['--beta', '--say', 'Tell me a story']);
    assertSavedAnswer(result, ['conversation.item.created', 'response.audio.delta']);
  });

  test('raw_ws_client.mjs sends a 16 kHz WAV file and saves the answer', async () => {
    const question = join(workDir, 'question-16k.wav');
    writeFileSync(question, encodeWav(resample(speech('Where is the station?'), REALTIME_RATE, 16_000), 16_000));
    const result = await runClient('raw_ws_client.mjs', ['--wav', question]);
    assertSavedAnswer(result, ['response.output_audio.delta', 'response.output_audio_transcript.done']);
    const sent = Number(/caller: ([\d.]+) s of speech/.exec(result.stdout)?.[1]);
    const spoken = speech('Where is the station?').length / REALTIME_RATE;
    assert.ok(Math.abs(sent - spoken) < 0.02, `the 16 kHz WAV went out as ${sent} s at 24 kHz, spoken ${spoken} s`);
  });
});
