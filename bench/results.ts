/**
 * A benchmark's own section of bench/RESULTS.md, between its markers:
 * replaced on each run, or placed after the results table the first time.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ROOT } from "../test/harness.ts";

export function writeResultsSection(name: string, heading: string, report: string): void {
  const path = join(ROOT, "bench/RESULTS.md");
  const previous = readFileSync(path, "utf8");
  const [start, end] = [`<!-- ${name}:start -->`, `<!-- ${name}:end -->`];
  const section = `${start}\n${report}\n${end}`;
  writeFileSync(
    path,
    previous.includes(start)
      ? previous.slice(0, previous.indexOf(start)) + section + previous.slice(previous.indexOf(end) + end.length)
      : previous.replace("<!-- results:end -->", `<!-- results:end -->\n\n### ${heading}\n\n${section}`),
  );
}
