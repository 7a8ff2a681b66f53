// The command line both example clients share: options, the caller's speech, one manual voice turn
// over whatever socket the client opened, the event printout, latency figures and the answer WAV.

import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import { REALTIME_RATE, encodeWav, readWavFile, synthesizeSpeech } from './audio.mjs';
import { EventLog, manualSessionUpdate, speechTurn } from './realtime.mjs';

const USAGE = `options:
  --url URL            server root, http(s):// or ws(s):// (default $OMNIVOX_URL or http://127.0.0.1:8000)
  --model NAME         model id sent as ?model= (default qwen-omni)
  --api-key KEY        Bearer key (default $OMNIVOX_API_KEY, $OPENAI_API_KEY or sk-local)
  --wav FILE           the caller's speech: a 16-bit PCM WAV, any rate (resampled to 24 kHz)
  --say TEXT           the caller's speech, spoken by espeak-ng (default "What is the capital of France?")
  --out FILE           where the answer is saved as a 24 kHz WAV (default answer.wav)
  --play               also play the answer (aplay, ffplay or sox play, whichever is installed)
  --voice NAME         assistant voice (alloy, ash, ...)
  --instructions TEXT  system instructions for the session
  --beta               speak the beta dialect (OpenAI-Beta: realtime=v1) instead of GA
  --verbose            print every audio and transcript delta, not only the first of each
  --timeout SECONDS    give up after this long (default 60)`;

export function parseClientArgs(argv, description) {
  const { values } = parseArgs({
    args: argv,
    options: {
      url: { type: 'string', default: process.env.OMNIVOX_URL ?? 'http://127.0.0.1:8000' },
      model: { type: 'string', default: 'qwen-omni' },
      'api-key': {
        type: 'string',
        default: process.env.OMNIVOX_API_KEY ?? process.env.OPENAI_API_KEY ?? 'sk-local',
      },
      wav: { type: 'string' },
      say: { type: 'string', default: 'What is the capital of France?' },
      out: { type: 'string', default: 'answer.wav' },
      play: { type: 'boolean', default: false },
      voice: { type: 'string' },
      instructions: { type: 'string' },
      beta: { type: 'boolean', default: false },
      verbose: { type: 'boolean', default: false },
      timeout: { type: 'string', default: '60' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(`${description}\n\n${USAGE}`);
    process.exit(0);
  }
  return { ...values, dialect: values.beta ? 'beta' : 'ga', timeoutMs: Number(values.timeout) * 1000 };
}

/** Prints one line per server event, time-stamped from `start`; deltas only once per kind unless verbose. */
function eventPrinter(start, verbose) {
  const deltasSeen = new Set();
  return (event) => {
    const elapsed = `+${Math.round(performance.now() - start)} ms`.padStart(10);
    if (event.type.endsWith('.delta')) {
      if (!verbose && deltasSeen.has(event.type)) return;
      deltasSeen.add(event.type);
      const isAudio = event.type.endsWith('audio.delta');
      const shown = isAudio ? `${Buffer.from(event.delta, 'base64').length} B` : JSON.stringify(event.delta);
      console.log(`${elapsed}  <- ${event.type} ${shown}${verbose ? '' : ' (further ones not shown)'}`);
      return;
    }
    const detail =
      event.type === 'error'
        ? ` ${event.error.code ?? event.error.type}: ${event.error.message}`
        : event.response?.status && event.response.status !== 'in_progress'
          ? ` status=${event.response.status}`
          : '';
    console.log(`${elapsed}  <- ${event.type}${detail}`);
  };
}

function playAnswer(wav) {
  const players = [
    ['aplay', ['-q', '-']],
    ['ffplay', ['-nodisp', '-autoexit', '-loglevel', 'error', '-']],
    ['play', ['-q', '-t', 'wav', '-']],
  ];
  return new Promise((resolve) => {
    const tryPlayer = (index) => {
      if (index >= players.length) {
        console.error('no audio player found (aplay, ffplay, play); the answer is only saved');
        resolve();
        return;
      }
      const [command, args] = players[index];
      const child = spawn(command, args, { stdio: ['pipe', 'inherit', 'inherit'] });
      child.on('error', () => tryPlayer(index + 1));
      child.on('close', resolve);
      child.stdin.on('error', () => {});
      child.stdin.end(wav);
    };
    tryPlayer(0);
  });
}

function report(log, marks, answer) {
  const since = (from, type) => {
    const at = log.firstArrival(type);
    return at === null ? 'n/a' : `${Math.round(at - from)} ms`;
  };
  const seconds = (answer.samples.length / REALTIME_RATE).toFixed(2);
  console.log(`\nanswer: ${seconds} s of audio, transcript ${JSON.stringify(answer.transcript)}`);
  console.log(
    `latency: commit -> committed ${since(marks.commit, 'input_audio_buffer.committed')}` +
      ` | response.create -> response.created ${since(marks.create, 'response.created')}` +
      ` | -> first audio ${since(marks.create, log.names.audioDelta)}` +
      ` | -> response.done ${since(marks.create, 'response.done')}`,
  );
}

/**
 * Runs one voice turn. `connect(options, onEvent, onClose)` opens the client's socket, resolves when it is
 * open, and returns `{ send(event), close() }`; everything else is the same for every client.
 */
export async function runVoiceTurn({ description, connect }) {
  const options = parseClientArgs(process.argv.slice(2), description);
  const speech = options.wav ? readWavFile(options.wav) : synthesizeSpeech(options.say);
  console.log(`caller: ${(speech.length / REALTIME_RATE).toFixed(2)} s of speech (${options.wav ?? 'espeak-ng'})`);
  const start = performance.now();
  const log = new EventLog(options.dialect, { onEvent: eventPrinter(start, options.verbose) });
  const connection = await connect(options, (event) => log.record(event), (reason) => log.close(reason));
  const marks = {};
  try {
    await log.next('session.created', options.timeoutMs);
    connection.send(manualSessionUpdate(options.dialect, options));
    await log.next('session.updated', options.timeoutMs);
    speechTurn(speech).forEach((event) => connection.send(event));
    marks.commit = performance.now();
    await log.next('input_audio_buffer.committed', options.timeoutMs);
    connection.send({ type: 'response.create' });
    marks.create = performance.now();
    const done = await log.next('response.done', options.timeoutMs);
    const answer = log.answer(done.response.id);
    const wav = encodeWav(answer.samples);
    writeFileSync(options.out, wav);
    report(log, marks, answer);
    console.log(`saved ${options.out}`);
    if (options.play) await playAnswer(wav);
    const errors = log.ofType('error');
    return done.response.status === 'completed' && errors.length === 0 ? 0 : 1;
  } finally {
    connection.close();
  }
}

/** Runs `main` and exits with its status, printing a failure without a stack trace users do not need. */
export function exitWith(main) {
  main().then(
    (status) => process.exit(status),
    (error) => {
      console.error(`error: ${error.message}`);
      process.exit(1);
    },
  );
}
