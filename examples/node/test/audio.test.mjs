// The clients' audio plumbing, no server needed: WAV in and out, resampling, PCM16 framing for appends.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  REALTIME_RATE,
  appendEvents,
  decodeWav,
  encodeWav,
  pcm16Bytes,
  pcm16Samples,
  peak,
  resample,
  synthesizeSpeech,
} from '../lib/audio.mjs';

/** A sine tone as PCM16 samples. */
function tone(rate, seconds, hz = 440) {
  const length = Math.round(rate * seconds);
  return Int16Array.from({ length }, (_, i) => Math.round(8000 * Math.sin((2 * Math.PI * hz * i) / rate)));
}

test('a WAV written by encodeWav reads back sample for sample', () => {
  const samples = tone(REALTIME_RATE, 0.1);
  const wav = decodeWav(encodeWav(samples));
  assert.equal(wav.rate, REALTIME_RATE);
  assert.deepEqual(wav.samples, samples);
});

test('stereo WAVs are mixed to mono, and a streaming header (size 0xFFFFFFFF) is read to the end', () => {
  const stereo = encodeWav(Int16Array.from([1000, 3000, -2000, -4000]), 8000);
  stereo.writeUInt16LE(2, 22);
  stereo.writeUInt32LE(0xffffffff, 40);
  assert.deepEqual(decodeWav(stereo).samples, Int16Array.from([2000, -3000]));
});

test('resampling keeps the duration and the pitch', () => {
  const source = tone(16_000, 1.0, 500);
  const upsampled = resample(source, 16_000, REALTIME_RATE);
  assert.equal(upsampled.length, REALTIME_RATE);
  const crossings = upsampled.slice(1).filter((sample, i) => upsampled[i] < 0 && sample >= 0).length;
  assert.ok(Math.abs(crossings - 500) <= 2, `${crossings} rising zero crossings in 1 s of a 500 Hz tone`);
});

test('espeak-ng speech comes out as audible 24 kHz audio of a plausible length', () => {
  const speech = synthesizeSpeech('Hello world');
  const seconds = speech.length / REALTIME_RATE;
  assert.ok(seconds > 0.4 && seconds < 3, `${seconds} s`);
  assert.ok(peak(speech) > 0.1);
});

test('appends carry 100 ms of PCM16 each and add up to the whole input', () => {
  const samples = tone(REALTIME_RATE, 0.25);
  const events = appendEvents(samples);
  const sizes = events.map((event) => Buffer.from(event.audio, 'base64').length);
  assert.deepEqual(sizes, [4800, 4800, 2400]);
  const joined = Buffer.concat(events.map((event) => Buffer.from(event.audio, 'base64')));
  assert.deepEqual(pcm16Samples(joined), samples);
});

test('an odd PCM16 byte count is refused rather than silently misaligned', () => {
  assert.throws(() => pcm16Samples(Buffer.alloc(3)), /odd byte count/);
  assert.equal(pcm16Bytes(Int16Array.from([-1])).toString('hex'), 'ffff');
});
