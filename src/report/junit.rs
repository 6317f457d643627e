//! `junit.xml`: one test suite per layer, one test case per check (a
//! script's subtests too, each with the property `part_of`), written with
//! quick-junit. Degraded checks pass in JUnit terms (the lane exits 0)
//! but carry `outcome=degraded` as a property and the reason in system-out,
//! so CI dashboards can still show them.

use super::RunReport;
use crate::check::Outcome;
use anyhow::Result;
use quick_junit::{
    NonSuccessKind, Property, Report, TestCase, TestCaseStatus, TestRerun, TestSuite,
};
use std::time::Duration;

pub fn render(report: &RunReport) -> Result<String> {
    let mut junit = Report::new(format!(
        "photon-cluster {} ({})",
        report.lane, report.cluster
    ));
    junit.set_time(Duration::from_secs_f64(report.duration_s));
    for layer in &report.layers {
        let mut suite = TestSuite::new(layer.name.clone());
        suite.set_time(Duration::from_secs_f64(layer.duration_s));
        for c in &layer.checks {
            let status = match c.outcome {
                Outcome::Pass | Outcome::Degraded => TestCaseStatus::success(),
                // A pass after reruns: a success with its earlier failures
                // as <flakyFailure> (surefire's form, which CI tools read).
                Outcome::Flaky => {
                    let mut s = TestCaseStatus::success();
                    for f in c.flaky.iter().flat_map(|f| &f.failures) {
                        let mut rerun = TestRerun::new(NonSuccessKind::Failure);
                        rerun.set_message(f.message.clone());
                        rerun.set_type(c.kind.clone());
                        rerun.set_description(serde_json::to_string_pretty(&f.evidence)?);
                        s.add_rerun(rerun);
                    }
                    s
                }
                Outcome::Skipped => {
                    let mut s = TestCaseStatus::skipped();
                    s.set_message(c.message.clone());
                    s
                }
                Outcome::Fail => {
                    let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    s.set_message(c.message.clone());
                    s.set_type(c.kind.clone());
                    s.set_description(serde_json::to_string_pretty(&c.evidence)?);
                    s
                }
            };
            let mut case = TestCase::new(c.id.clone(), status);
            case.set_classname(format!("{}.{}", report.lane, layer.name));
            case.set_time(Duration::from_secs_f64(c.duration_s));
            case.add_property(Property::new("outcome", c.outcome.name()));
            case.add_property(Property::new("kind", c.kind.clone()));
            case.add_property(Property::new("origin", c.origin.clone()));
            if let Some(of) = &c.part_of {
                case.add_property(Property::new("part_of", of.clone()));
            }
            if c.outcome != Outcome::Fail {
                case.set_system_out(format!(
                    "{}: {}\n{}",
                    c.outcome.name(),
                    c.message,
                    serde_json::to_string_pretty(&c.evidence)?
                ));
            }
            suite.add_test_case(case);
        }
        junit.add_test_suite(suite);
    }
    if let Some(err) = &report.error {
        let mut suite = TestSuite::new("infrastructure");
        let mut s = TestCaseStatus::non_success(NonSuccessKind::Error);
        s.set_message(err.clone());
        suite.add_test_case(TestCase::new("infrastructure", s));
        junit.add_test_suite(suite);
    }
    Ok(junit.to_string()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_part_is_a_testcase_and_a_failed_one_carries_its_evidence() {
        let xml = super::render(&super::super::tests::with_subtests()).unwrap();
        let case = |id: &str| {
            let from = xml.find(&format!("<testcase name=\"{id}\"")).expect(id);
            let to = from + xml[from..].find("</testcase>").unwrap();
            xml[from..to].to_string()
        };
        assert_eq!(xml.matches("<testcase ").count(), 4, "{xml}");
        let boots = case("s/boots");
        assert!(boots.contains("part_of\" value=\"s\""), "{boots}");
        assert!(!boots.contains("<failure"), "{boots}");
        let breaks = case("s/breaks");
        assert!(
            breaks.contains("<failure message=\"AssertionError: no\" type=\"subtest\""),
            "{breaks}"
        );
        assert!(breaks.contains("Traceback"), "{breaks}");
        assert!(breaks.contains("origin\" value=\"s.py:7\""), "{breaks}");
        // In lane order: the script, then its subtests, then the next check.
        let at = |id: &str| xml.find(&format!("name=\"{id}\"")).unwrap();
        assert!(at("s") < at("s/boots") && at("s/breaks") < at("other"));
    }
}
